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


def test_fid_report_counts_and_bootstrap_interval():
    gen = torch.Generator().manual_seed(5)
    real = [torch.randn(4, 10, generator=gen, dtype=torch.float64) for _ in range(8)]
    synth = [torch.randn(4, 10, generator=gen, dtype=torch.float64) + 0.7 for _ in range(6)]
    rep = D.fid_report(real, synth, n_bootstrap=50)
    assert (rep["n_real"], rep["n_synthetic"], rep["n_real_features"], rep["n_synthetic_features"]) == (8, 6, 32, 24)
    assert rep["ci"]["n_bootstrap"] == 50
    assert rep["ci"]["low"] <= rep["value"] * 1.5 and rep["ci"]["low"] < rep["ci"]["high"]
    kid = D.kid_report(real, synth, subset_size=16, n_subsets=10, n_bootstrap=20)
    assert kid["n_real"] == 8 and kid["subset_size"] == 16 and kid["ci"]["low"] <= kid["ci"]["high"]


def test_image_mmd_grows_with_the_difference_between_sets():
    rng = np.random.default_rng(6)
    real = [rng.random((6, 6, 6)) for _ in range(6)]
    same = [rng.random((6, 6, 6)) for _ in range(6)]
    brighter = [v + 0.5 for v in same]
    near, far = D.image_mmd(real, same), D.image_mmd(real, brighter)
    assert far["value"] > 10 * abs(near["value"])
    assert D.image_mmd(real, same[:3])["n_per_set"] == 3


def test_metric_vs_count_covers_every_count():
    gen = torch.Generator().manual_seed(7)
    real = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(6)]
    synth = [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    curve = D.metric_vs_count(real, synth, repeats=2)
    assert curve["counts"] == [2, 4, 5]
    assert len(curve["fid_mean"]) == 3 and curve["fid_std"][-1] == 0.0
