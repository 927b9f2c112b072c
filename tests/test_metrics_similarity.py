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


def test_masked_ssim_ignores_what_lies_outside_the_mask(volume):
    rng = np.random.default_rng(1)
    mask = np.zeros(volume.shape, bool)
    mask[8:14, 8:14, 5:10] = True
    pred = volume + 0.05 * rng.standard_normal(volume.shape).astype(np.float32)
    base = S.ssim(pred, volume, mask)
    changed_outside = np.where(mask, pred, rng.random(volume.shape).astype(np.float32) * 5)
    assert S.ssim(changed_outside, volume, mask) == pytest.approx(base, abs=1e-6)
    assert S.mae(changed_outside, volume, mask) == pytest.approx(S.mae(pred, volume, mask))
    changed_inside = np.where(mask, 1 - pred, pred)
    assert S.ssim(changed_inside, volume, mask) < base - 0.1


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


def test_ms_ssim_settings_fit_small_volumes_where_monai_defaults_fail(volume):
    import torch
    from monai.metrics.regression import compute_ms_ssim

    t = torch.as_tensor(volume)[None, None]
    with pytest.raises(ValueError):
        compute_ms_ssim(t, t, 3)
    settings = S.ms_ssim_settings(volume.shape)
    assert settings["n_scales"] >= 2 and abs(sum(settings["weights"]) - 1) < 1e-9
    assert S.ms_ssim_settings((200, 200, 200))["n_scales"] == 5


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
