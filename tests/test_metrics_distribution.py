"""Known answers for FID, KID and MMD."""

import numpy as np
import pytest
import scipy.linalg
import torch

from common.metrics import distribution as D


def _closed_form_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_with_itself_is_zero_on_both_paths():
    gen = torch.Generator().manual_seed(0)
    few = torch.randn(20, 64, generator=gen, dtype=torch.float64)  # fewer rows than dims: low-rank path
    many = torch.randn(200, 8, generator=gen, dtype=torch.float64)  # MONAI's sqrtm path
    assert D.frechet_distance(few, few) == pytest.approx(0, abs=1e-8)
    assert D.frechet_distance(many, many) == pytest.approx(0, abs=1e-6)
    assert D.frechet_distance(many, many, reference=True) == pytest.approx(0, abs=1e-6)
    # grouped per volume (list of matrices) is the same as the stacked rows
    assert D.frechet_distance([few[:10], few[10:]], [few]) == pytest.approx(0, abs=1e-8)


def test_fid_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 2.0])
    s1 = np.diag([1.0, 2.0, 0.5])
    a = rng.standard_normal((3, 3))
    s2 = a @ a.T + 0.5 * np.eye(3)
    x = rng.multivariate_normal(mu1, s1, 40000)
    y = rng.multivariate_normal(mu2, s2, 40000)
    expected = _closed_form_fid(mu1, s1, mu2, s2)
    assert D.frechet_distance(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(expected, rel=0.03)


def test_low_rank_fid_equals_the_full_matrix_formula():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 30)), rng.standard_normal((15, 30)) * 1.5 + 0.3
    expected = _closed_form_fid(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert D.frechet_distance(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(expected, rel=1e-6)


def test_fast_fid_equals_monai_reference():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(60, 10, generator=gen, dtype=torch.float64)
    y = torch.randn(50, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen, dtype=torch.float64)
    assert D.frechet_distance(x, y) == pytest.approx(D.frechet_distance(x, y, reference=True), rel=1e-6)


def test_kid_estimator_is_unbiased_where_the_biased_one_is_not():
    gen = torch.Generator().manual_seed(3)
    unbiased, biased = [], []
    for _ in range(300):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        unbiased.append(D.mmd2_unbiased(x, y))
        k = D._poly_kernel
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    se = np.std(unbiased) / np.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert min(unbiased) < 0 < max(unbiased)  # an unbiased estimate of 0 must sometimes go negative
    assert np.mean(biased) > 10 * se


def test_kid_same_distribution_near_zero_shifted_clearly_positive_and_subset_size_reported():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    same = D.kernel_inception_distance(x, y, subset_size=100, n_subsets=20)
    shifted = D.kernel_inception_distance(x, y + 1.0, subset_size=100, n_subsets=20)
    assert same["subset_size"] == 100 and same["n_subsets"] == 20
    assert abs(same["mean"]) < 0.1 * shifted["mean"]
    assert D.kernel_inception_distance(x[:30], y, subset_size=1000)["subset_size"] == 30


def test_fid_report_counts_and_half_sampling_interval():
    gen = torch.Generator().manual_seed(5)
    real = [torch.randn(4, 10, generator=gen, dtype=torch.float64) for _ in range(8)]
    synth = [torch.randn(4, 10, generator=gen, dtype=torch.float64) + 0.7 for _ in range(6)]
    rep = D.fid_report(real, synth, n_subsamples=50)
    assert (rep["n_real"], rep["n_synthetic"], rep["n_real_features"], rep["n_synthetic_features"]) == (8, 6, 32, 24)
    ci = rep["ci"]
    assert ci["n_subsamples"] == 50 and ci["subsample_size"] == [4, 3] and "without replacement" in ci["method"]
    assert ci["low"] < rep["value"] < ci["high"]  # centred on its point estimate, unlike the bootstrap's
    kid = D.kid_report(real, synth, subset_size=16, n_subsets=10, n_subsamples=20)
    assert kid["n_real"] == 8 and kid["subset_size"] == 16 and kid["ci"]["low"] < kid["mean"] < kid["ci"]["high"]
    tiny = D.fid_report(real[:3], synth[:3], n_subsamples=5)
    assert tiny["ci"]["low"] is None and "at least 4" in tiny["ci"]["note"]


@pytest.mark.slow  # 100 simulated studies of 24 vs 24 volumes, 30 half-samples each: 10-30 s on a shared CPU
def test_half_sampling_intervals_cover_the_true_value_at_their_nominal_rate(one_torch_thread):
    """FID's target is its expectation at this sample size (it has a small-sample bias); KID's is the population
    MMD^2 (KID is unbiased). A 95 % interval should contain them in about 95 % of repeated studies."""
    gen = torch.Generator().manual_seed(0)

    def study(n=24):
        real = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(n)]
        synth = [torch.randn(2, 3, generator=gen, dtype=torch.float64) * 1.2 + 0.3 for _ in range(n)]
        return real, synth

    fid_target = float(np.mean([D.frechet_distance(*study()) for _ in range(400)]))
    kid_target = D.mmd2_unbiased(torch.randn(6000, 3, generator=gen, dtype=torch.float64),
                                 torch.randn(6000, 3, generator=gen, dtype=torch.float64) * 1.2 + 0.3)

    def kid(r, s):
        return D.mmd2_unbiased(torch.cat(r), torch.cat(s))

    hits_fid = hits_kid = 0
    trials = 100
    for k in range(trials):
        real, synth = study()
        ci = D.subsample_interval(D.frechet_distance, real, synth, None, 30, seed=k)
        hits_fid += ci["low"] <= fid_target <= ci["high"]
        ci = D.subsample_interval(kid, real, synth, None, 30, seed=k)
        hits_kid += ci["low"] <= kid_target <= ci["high"]
    assert 0.87 <= hits_fid / trials <= 0.995
    assert 0.85 <= hits_kid / trials <= 0.995


def test_image_mmd_equals_monai_and_grows_with_the_difference_between_sets():
    from monai.metrics import MMDMetric

    rng = np.random.default_rng(6)
    real = [rng.random((6, 6, 6)) for _ in range(6)]
    same = [rng.random((6, 6, 6)) for _ in range(6)]
    brighter = [v + 0.5 for v in same]
    near, far = D.image_mmd(real, same), D.image_mmd(real, brighter)
    expected = MMDMetric()(torch.as_tensor(np.stack(real))[:, None], torch.as_tensor(np.stack(brighter))[:, None])
    assert far["value"] == pytest.approx(float(expected), rel=1e-9)
    assert far["value"] > 10 * abs(near["value"])
    assert far["grid"] == [6, 6, 6] and far["value_per_voxel"] == pytest.approx(far["value"] / 216)
    assert "linear kernel" in far["definition"] and far["normalisation"] == "as given"
    unequal = D.image_mmd(real, same[:3])
    assert (unequal["n_real"], unequal["n_synthetic"]) == (6, 3)
    halves = D.MMDSums().add(real[0]).add(real[1]).merge(D.MMDSums().add(real[2]))
    whole = D.MMDSums().add(real[0]).add(real[1]).add(real[2])
    other = D.MMDSums().add(same[0]).add(same[1])
    assert D.mmd_from_sums(halves, other) == pytest.approx(D.mmd_from_sums(whole, other), rel=1e-12)


def test_metric_vs_count_covers_every_count():
    gen = torch.Generator().manual_seed(7)
    real = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    synth = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    curve = D.metric_vs_count(real, synth, repeats=2)
    assert curve["counts"] == [2, 4, 5]
    assert len(curve["fid_mean"]) == 3 and curve["fid_std"][-1] == 0.0
