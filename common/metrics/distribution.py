"""Distribution distances between real and synthetic sets: FID, KID, MMD, with half-sampling intervals.

Features come grouped per volume (a list of (rows, dim) matrices, see ``features.py``); confidence
intervals resample *volumes* (without replacement), not slices, because slices of one volume are not
independent samples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch



def _stack(features) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.double()
    return torch.cat([torch.as_tensor(f).reshape(-1, f.shape[-1]) for f in features]).double()


def frechet_distance(real, synthetic, reference: bool = False) -> float:
    """FID between two feature sets (rows = samples), in float64 on the features' device.

    ``reference=True`` uses MONAI's ``get_fid_score`` (scipy ``sqrtm`` on the CPU: the trusted reference,
    used for the reported point estimate). Otherwise an exact identity that runs on the GPU and is fast
    enough for the interval replicates and sample-count curves: tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)) with A = sqrt(S1),
    or, with fewer rows than dimensions, the nuclear norm of the (n1 x n2) cross matrix of centred rows.
    """
    a, b = _stack(real), _stack(synthetic)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature rows per set, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    b = b.to(a.device)
    if reference:
        from monai.metrics.fid import get_fid_score

        return max(0.0, float(get_fid_score(b.cpu(), a.cpu())))  # round-off can give -1e-14 for identical sets
    diff = a.mean(0) - b.mean(0)
    if min(a.shape[0], b.shape[0]) < a.shape[1]:
        ac = (a - a.mean(0)) / np.sqrt(a.shape[0] - 1)
        bc = (b - b.mean(0)) / np.sqrt(b.shape[0] - 1)
        tr_a, tr_b = (ac * ac).sum(), (bc * bc).sum()
        tr_covmean = torch.linalg.svdvals(ac @ bc.T).sum()
    else:
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        tr_a, tr_b = cov_a.trace(), cov_b.trace()
        w, u = torch.linalg.eigh(cov_a)
        sqrt_a = (u * w.clamp_min(0).sqrt()) @ u.T
        tr_covmean = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return max(0.0, float(diff.dot(diff) + tr_a + tr_b - 2 * tr_covmean))


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel: Callable = _poly_kernel) -> float:
    """Unbiased squared MMD (Gretton et al. 2012, Lemma 6): diagonal terms excluded, can be negative."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_x + term_y - 2 * kxy.mean())  # (kernel on the features' device)


def kernel_inception_distance(
    real, synthetic, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0
) -> dict:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel averaged over random subsets.

    The subset size is capped by the smaller set and always reported, since KID's variance depends on it.
    """
    a, b = _stack(real), _stack(synthetic)
    size = int(min(subset_size, a.shape[0], b.shape[0]))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature rows per set, got {a.shape[0]} and {b.shape[0]}")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        ia = torch.randperm(a.shape[0], generator=gen)[:size]
        ib = torch.randperm(b.shape[0], generator=gen)[:size]
        values.append(mmd2_unbiased(a[ia], b[ib]))
    values = np.asarray(values)
    return {"mean": float(values.mean()), "std": float(values.std()), "subset_size": size, "n_subsets": n_subsets}


class MMDSums:
    """Running sums for MONAI's linear-kernel unbiased MMD^2 (``MMDMetric``) over a stream of volumes.

    sum_{i != j} <y_i, y_j> = |sum_i y_i|^2 - sum_i |y_i|^2, so the sum of the volumes, the sum of their squared
    norms and the count are all it needs: memory stays flat, and sums from shards add up.
    """

    def __init__(self):
        self.total, self.sq, self.n = None, 0.0, 0

    def add(self, volume) -> "MMDSums":
        v = torch.as_tensor(np.asarray(volume), dtype=torch.float64).flatten()
        self.total = v.clone() if self.total is None else self.total + v
        self.sq += float(v.dot(v))
        self.n += 1
        return self

    def merge(self, other: "MMDSums") -> "MMDSums":
        if other.n:
            self.total = other.total.clone() if self.total is None else self.total + other.total
            self.sq += other.sq
            self.n += other.n
        return self


def mmd_from_sums(real: MMDSums, synthetic: MMDSums) -> float:
    """Unbiased linear-kernel MMD^2 (Gretton et al. 2012, Lemma 6; MONAI ``compute_mmd``) from running sums."""
    m, n = real.n, synthetic.n
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 images per set, got {m} and {n}")
    within_r = (float(real.total.dot(real.total)) - real.sq) / (m * (m - 1))
    within_s = (float(synthetic.total.dot(synthetic.total)) - synthetic.sq) / (n * (n - 1))
    return within_r + within_s - 2 * float(real.total.dot(synthetic.total)) / (m * n)


MMD_DEFINITION = ("MONAI MMDMetric: unbiased MMD^2 with a linear kernel on the voxels (diagonal terms left out), "
                  "about |mean real image - mean synthetic image|^2 summed over voxels: it grows with the number "
                  "of voxels and with intensity^2, so compare values at one grid and normalisation only")


def mmd_report(real: MMDSums, synthetic: MMDSums, grid, normalisation: str) -> dict:
    """The MMD value with what it depends on: grid, voxel count, per-voxel value, normalisation, counts."""
    value = mmd_from_sums(real, synthetic)
    n_voxels = int(np.prod(grid))
    return {"value": value, "value_per_voxel": value / n_voxels, "n_real": real.n, "n_synthetic": synthetic.n,
            "grid": list(grid), "n_voxels": n_voxels, "normalisation": normalisation, "definition": MMD_DEFINITION}


def image_mmd(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray], seed: int = 0,
              normalisation: str = "as given") -> dict:
    """MMD between image sets as in the 3D VQGAN / brain-generation papers (MONAI's linear-kernel ``MMDMetric``).

    Every image of both sets counts (the sums form takes unequal set sizes; MONAI needs equal ones). Lower is
    better. ``seed`` is kept for callers of the former subsampled version and has no effect.
    """
    if len(real) < 2 or len(synthetic) < 2:
        raise ValueError(f"MMD needs at least 2 images per set, got {len(real)} and {len(synthetic)}")
    shapes = {tuple(np.shape(v)) for v in list(real) + list(synthetic)}
    if len(shapes) != 1:
        raise ValueError(f"MMD needs images of one shape, got {sorted(shapes)}")
    r, sy = MMDSums(), MMDSums()
    for v in real:
        r.add(v)
    for v in synthetic:
        sy.add(v)
    out = mmd_report(r, sy, shapes.pop(), normalisation)
    out["n_per_set"] = min(r.n, sy.n)
    return out


def subsample_interval(
    statistic: Callable[[list, list], float],
    real_groups: Sequence,
    synth_groups: Sequence,
    point: float | None = None,
    n_subsamples: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Confidence interval of a two-sample statistic by half-sampling volumes *without* replacement.

    The percentile bootstrap duplicates volumes, which inflates FID (small-sample bias) and KID (k(x, x)
    terms of the copies), so its intervals sit above the point estimate. Here each replicate draws half of
    each set without replacement; for a mean, the variance of half-sample values around the full-sample value
    is (1/m - 1/n) s^2 = s^2 / n at m = n/2: the full-sample variance, with no copies. The interval is
    point +/- z * sd, centred on the point estimate: an interval for the statistic *at this sample size*
    (FID's upward small-sample bias is not removed: compare FIDs at equal counts). Coverage is checked by
    simulation in the tests.
    """
    from statistics import NormalDist

    n_r, n_s = len(real_groups), len(synth_groups)
    m_r, m_s = n_r // 2, n_s // 2
    base = {"method": "half-sampling without replacement, normal interval", "n_subsamples": 0,
            "subsample_size": [m_r, m_s], "confidence": confidence}
    if m_r < 2 or m_s < 2:
        return {"low": None, "high": None, **base, "note": "needs at least 4 volumes per set"}
    if point is None:
        point = statistic(list(real_groups), list(synth_groups))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsamples):
        ra = [real_groups[i] for i in rng.choice(n_r, m_r, replace=False)]
        sa = [synth_groups[i] for i in rng.choice(n_s, m_s, replace=False)]
        try:
            values.append(statistic(ra, sa))
        except ValueError:  # a subsample too small for the statistic: skip it
            continue
    if len(values) < 2:
        return {"low": None, "high": None, **base}
    # (1/m - 1/n) / (1/n) = n/m - 1: 1 at m = n/2, slightly more for odd n
    factor = np.sqrt(2.0 / ((n_r / m_r - 1) + (n_s / m_s - 1)))
    sd = float(np.std(values, ddof=1) * factor)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"low": float(point - z * sd), "high": float(point + z * sd), "sd": sd, **base,
            "n_subsamples": len(values)}


def to_device(groups: Sequence, device=None) -> list[torch.Tensor]:
    """Feature groups moved once to ``device`` (the GPU when present) for the many interval replicates."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [torch.as_tensor(g).to(device) for g in groups]


def fid_report(real_groups: Sequence, synth_groups: Sequence, n_subsamples: int = 100, seed: int = 0,
               device=None) -> dict:
    """FID (MONAI reference) with the sample counts it rests on and a half-sampling interval over volumes."""
    real_groups, synth_groups = to_device(real_groups, device), to_device(synth_groups, device)
    value = frechet_distance(real_groups, synth_groups, reference=True)
    return {
        "value": value,
        "n_real": len(real_groups),
        "n_synthetic": len(synth_groups),
        "n_real_features": int(sum(g.shape[0] for g in real_groups)),
        "n_synthetic_features": int(sum(g.shape[0] for g in synth_groups)),
        "ci": subsample_interval(frechet_distance, real_groups, synth_groups, value, n_subsamples, seed=seed),
    }


def kid_report(
    real_groups: Sequence, synth_groups: Sequence, subset_size: int = 1000, n_subsets: int = 100,
    n_subsamples: int = 50, seed: int = 0, device=None,
) -> dict:
    """KID (mean/std over subsets, subset size) with counts and a half-sampling interval over volumes."""
    real_groups, synth_groups = to_device(real_groups, device), to_device(synth_groups, device)
    report = kernel_inception_distance(real_groups, synth_groups, subset_size, n_subsets, seed)

    def statistic(r, s):
        return kernel_inception_distance(r, s, subset_size, max(1, n_subsets // 10), seed)["mean"]

    report.update(
        n_real=len(real_groups),
        n_synthetic=len(synth_groups),
        ci=subsample_interval(statistic, real_groups, synth_groups, report["mean"], n_subsamples, seed=seed),
    )
    return report


def metric_vs_count(
    real_groups: Sequence, synth_groups: Sequence, counts: Sequence[int] | None = None, repeats: int = 5,
    seed: int = 0, kid_subset_size: int = 1000, device=None,
) -> dict:
    """FID and KID against the number of synthetic volumes (all real ones kept): how far from converged are we?"""
    real_groups, synth_groups = to_device(real_groups, device), to_device(synth_groups, device)
    n = len(synth_groups)
    if counts is None:
        counts = sorted({c for c in (2, 4, 8, 16, 32, 64, 128, 256, 512, n) if 2 <= c <= n})
    rng = np.random.default_rng(seed)
    out = {"counts": list(counts), "fid_mean": [], "fid_std": [], "kid_mean": [], "kid_std": []}
    for c in counts:
        fids, kids = [], []
        for _ in range(repeats if c < n else 1):
            pick = [synth_groups[i] for i in rng.choice(n, c, replace=False)]
            fids.append(frechet_distance(real_groups, pick))
            kids.append(kernel_inception_distance(real_groups, pick, kid_subset_size, 10, seed)["mean"])
        out["fid_mean"].append(float(np.mean(fids)))
        out["fid_std"].append(float(np.std(fids)))
        out["kid_mean"].append(float(np.mean(kids)))
        out["kid_std"].append(float(np.std(kids)))
    return out
