"""Known answers for SSIM (masked), PSNR, MAE, MS-SSIM fidelity/diversity and percentile normalisation."""

import numpy as np
import pytest

from common.metrics import similarity as S


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    x = np.zeros((24, 24, 16), np.float32)
    x[4:20, 4:20, 2:14] = 0.5 + 0.2 * rng.standard_normal((16, 16, 12))
    return np.clip(x, 0, 1)


def test_identical_images_score_perfectly(volume):
    mask = np.zeros(volume.shape, np.int16)
    mask[8:14, 8:14, 5:10] = 2  # an integer label map: treated as "label > 0", never as indices
    assert S.ssim(volume, volume) == pytest.approx(1.0, abs=1e-5)
    assert S.ssim(volume, volume, mask) == pytest.approx(1.0, abs=1e-5)
    assert S.psnr(volume, volume, mask) == float("inf")
    assert S.mae(volume, volume, mask) == 0.0
    assert S.ms_ssim(volume, volume) == pytest.approx(1.0, abs=1e-5)


def test_masked_ssim_averages_the_whole_image_map_inside_the_mask(volume):
    """No zeroing outside the mask: far-away voxels do not matter, the mask's surroundings do (no fake edge)."""
    rng = np.random.default_rng(1)
    mask = np.zeros(volume.shape, bool)
    mask[8:14, 8:14, 5:10] = True
    pred = volume + 0.05 * rng.standard_normal(volume.shape).astype(np.float32)
    base = S.ssim(pred, volume, mask)
    smap = S.ssim_map(pred, volume)
    assert base == pytest.approx(float(smap[mask[5:-5, 5:-5, 5:-5]].mean()), abs=1e-6)
    far = np.zeros(volume.shape, bool)
    far[2:20, 2:20, :] = True  # beyond half a window (5 voxels) from the mask: outside its SSIM windows
    changed_far = np.where(far, pred, rng.random(volume.shape).astype(np.float32))
    assert S.ssim(changed_far, volume, mask) == pytest.approx(base, abs=1e-6)
    zeroed = S.ssim(pred * mask, volume * mask, mask)  # the former definition: both share an artificial edge
    assert zeroed > base + 0.01
    changed_inside = np.where(mask, 1 - pred, pred)
    assert S.ssim(changed_inside, volume, mask) < base - 0.1


def test_standard_ssim_equals_scikit_image(volume):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(5)
    pred = np.clip(volume + 0.1 * rng.standard_normal(volume.shape), 0, 1).astype(np.float32)
    expected = structural_similarity(pred.astype(np.float64), volume.astype(np.float64), data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert S.ssim(pred, volume) == pytest.approx(expected, abs=1e-5)
    assert S.ssim(pred, volume, option="w7") != pytest.approx(expected, abs=1e-3)  # a different, named window
    assert S.describe_ssim(S.ssim_option()).startswith("standard: 11-voxel Gaussian window")


def test_quality_falls_with_noise(volume):
    rng = np.random.default_rng(2)
    noise = rng.standard_normal(volume.shape).astype(np.float32)
    scores = [S.ssim(volume + s * noise, volume) for s in (0.01, 0.05, 0.2)]
    assert 1 > scores[0] > scores[1] > scores[2]
    psnrs = [S.psnr(volume + s * noise, volume) for s in (0.01, 0.05, 0.2)]
    assert psnrs[0] > psnrs[1] > psnrs[2]


def test_masked_psnr_with_a_full_mask_equals_monai(volume):
    pred = volume * 0.9
    full = np.ones(volume.shape, bool)
    expected = 10 * np.log10(1 / np.mean((pred.astype(np.float64) - volume) ** 2))
    assert S.psnr(pred, volume) == pytest.approx(expected, rel=1e-5)
    assert S.psnr(pred, volume, full) == pytest.approx(expected, rel=1e-5)


def test_percentile_normalise_clips_outliers(volume):
    spiked = volume.copy()
    spiked[10, 10, 8] = 1000.0
    norm = S.percentile_normalise(spiked)
    assert norm.min() == 0 and norm.max() == 1
    assert np.median(norm[volume > 0]) > 0.3  # one hot voxel does not squash the brain to ~0
    assert (norm[volume == 0] == 0).all()


def test_ms_ssim_options_are_named_and_fixed(volume):
    import torch
    from monai.metrics.regression import compute_ms_ssim

    t = torch.as_tensor(volume)[None, None]
    with pytest.raises(ValueError):
        compute_ms_ssim(t, t, 3)
    assert S.ms_ssim_settings((200, 200, 200))["name"] == "standard"
    assert S.ms_ssim_settings((200, 200, 200))["weights"] == pytest.approx((0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    ldm = S.ms_ssim_settings((128, 128, 64))
    assert (ldm["name"], ldm["kernel_size"], ldm["n_scales"]) == ("3-scale", 11, 3)
    assert S.ms_ssim_settings((96, 96, 96)) == S.ms_ssim_settings((128, 128, 64))  # no drift with size
    small = S.ms_ssim_settings(volume.shape)
    assert small["name"] == "2-scale-w5" and abs(sum(small["weights"]) - 1) < 1e-9
    with pytest.raises(ValueError, match="176"):
        S.ms_ssim(np.zeros((128, 128, 64)), np.zeros((128, 128, 64)), settings="standard")
    with pytest.raises(ValueError, match="unknown MS-SSIM option"):
        S.ms_ssim_settings((64, 64, 64), "huge")


def test_diversity_uses_a_seeded_stated_number_of_pairs(volume):
    rng = np.random.default_rng(4)
    samples = [np.clip(volume + 0.1 * rng.standard_normal(volume.shape), 0, 1).astype(np.float32) for _ in range(6)]
    loads = []

    def loader(i):
        def load():
            loads.append(i)
            return samples[i]
        return load

    groups = {"a": [loader(i) for i in range(6)], "b": [loader(i) for i in range(3)]}
    all_pairs = S.ms_ssim_diversity(groups, max_pairs=None)
    assert all_pairs["n_pairs"] == all_pairs["n_pairs_possible"] == 15 + 3
    some = S.ms_ssim_diversity(groups, max_pairs=7, seed=1)
    again = S.ms_ssim_diversity(groups, max_pairs=7, seed=1)
    assert some["n_pairs"] == 7 and some["n_pairs_possible"] == 18 and some["max_pairs"] == 7
    assert some["mean"] == again["mean"]
    assert S.diversity_pairs({"a": 6, "b": 3}, 7, 1) == S.diversity_pairs({"b": 3, "a": 6}, 7, 1)
    assert S.diversity_pairs({"a": 6, "b": 3}, 7, 1) != S.diversity_pairs({"a": 6, "b": 3}, 7, 2)
    assert abs(some["mean"] - all_pairs["mean"]) < 0.05


def test_fidelity_and_diversity(volume):
    rng = np.random.default_rng(3)
    real = [volume, volume[::-1].copy()]
    close = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in real]
    far = [r + 0.3 * rng.standard_normal(r.shape).astype(np.float32) for r in real]
    assert S.ms_ssim_fidelity(close, real)["mean"] > S.ms_ssim_fidelity(far, real)["mean"]
    assert S.ms_ssim_fidelity(close, real)["n_pairs"] == 2
    copies = {"a": [volume, volume.copy(), volume.copy()], "lonely": [volume]}
    varied = {"a": [volume + 0.3 * rng.standard_normal(volume.shape).astype(np.float32) for _ in range(3)]}
    d_copies = S.ms_ssim_diversity(copies)
    assert d_copies["mean"] == pytest.approx(1.0, abs=1e-5)
    assert d_copies["n_pairs"] == 3 and d_copies["n_conditions_skipped"] == 1
    assert S.ms_ssim_diversity(varied)["mean"] < d_copies["mean"] - 0.05


def test_paired_scores_report_brain_and_lesion(volume):
    label = np.zeros(volume.shape, np.uint8)
    label[8:14, 8:14, 5:10] = 3
    scores = S.paired_scores(volume, volume, lesion_mask=label)
    assert scores["ssim_brain"] == pytest.approx(1, abs=1e-5) and scores["ssim_lesion"] == pytest.approx(1, abs=1e-5)
    assert scores["mae_lesion"] == 0
    with pytest.raises(ValueError, match="lesion mask shape"):
        S.paired_scores(volume, volume, lesion_mask=label[:-1])
