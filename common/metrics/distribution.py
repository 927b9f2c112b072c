"""Distribution distances between real and synthetic sets: FID, KID, MMD, with bootstrap intervals.

Features come grouped per volume (a list of (rows, dim) matrices, see ``features.py``); confidence
intervals resample *volumes*, not slices, because slices of one volume are not independent samples.
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
    enough for bootstraps and sample-count curves: tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)) with A = sqrt(S1),
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


def image_mmd(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray], seed: int = 0) -> dict:
    """MMD between image sets as in the 3D VQGAN / brain-generation papers (MONAI's linear-kernel ``MMDMetric``).

    MONAI needs equal set sizes: both sets are subsampled to the smaller one (reported). Lower is better.
    """
    from monai.metrics import MMDMetric

    n = min(len(real), len(synthetic))
    if n < 2:
        raise ValueError(f"MMD needs at least 2 images per set, got {len(real)} and {len(synthetic)}")
    rng = np.random.default_rng(seed)
    ir = rng.choice(len(real), n, replace=False)
    isy = rng.choice(len(synthetic), n, replace=False)
    y = torch.stack([torch.as_tensor(np.asarray(real[i]), dtype=torch.float64)[None] for i in ir])
    y_pred = torch.stack([torch.as_tensor(np.asarray(synthetic[i]), dtype=torch.float64)[None] for i in isy])
    value = MMDMetric()(y, y_pred)
    return {"value": float(value), "n_per_set": int(n)}


def bootstrap_interval(
    statistic: Callable[[list, list], float],
    real_groups: Sequence,
    synth_groups: Sequence,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap over volumes: resample each set with replacement and recompute the statistic."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_bootstrap):
        ra = [real_groups[i] for i in rng.integers(0, len(real_groups), len(real_groups))]
        sa = [synth_groups[i] for i in rng.integers(0, len(synth_groups), len(synth_groups))]
        try:
            values.append(statistic(ra, sa))
        except ValueError:  # a resample too small for the statistic: skip it
            continue
    if not values:
        return {"low": None, "high": None, "n_bootstrap": 0, "confidence": confidence}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"low": float(low), "high": float(high), "n_bootstrap": len(values), "confidence": confidence}


def to_device(groups: Sequence, device=None) -> list[torch.Tensor]:
    """Feature groups moved once to ``device`` (the GPU when present) for the many bootstrap resamples."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [torch.as_tensor(g).to(device) for g in groups]


def fid_report(real_groups: Sequence, synth_groups: Sequence, n_bootstrap: int = 200, seed: int = 0,
               device=None) -> dict:
    """FID (MONAI reference) with the sample counts it rests on and a bootstrap interval over volumes."""
    real_groups, synth_groups = to_device(real_groups, device), to_device(synth_groups, device)
    return {
        "value": frechet_distance(real_groups, synth_groups, reference=True),
        "n_real": len(real_groups),
        "n_synthetic": len(synth_groups),
        "n_real_features": int(sum(g.shape[0] for g in real_groups)),
        "n_synthetic_features": int(sum(g.shape[0] for g in synth_groups)),
        "ci": bootstrap_interval(frechet_distance, real_groups, synth_groups, n_bootstrap, seed=seed),
    }


def kid_report(
    real_groups: Sequence, synth_groups: Sequence, subset_size: int = 1000, n_subsets: int = 100,
    n_bootstrap: int = 100, seed: int = 0, device=None,
) -> dict:
    """KID (mean/std over subsets, subset size) with counts and a bootstrap interval over volumes."""
    real_groups, synth_groups = to_device(real_groups, device), to_device(synth_groups, device)
    report = kernel_inception_distance(real_groups, synth_groups, subset_size, n_subsets, seed)

    def statistic(r, s):
        return kernel_inception_distance(r, s, subset_size, max(1, n_subsets // 10), seed)["mean"]

    report.update(
        n_real=len(real_groups),
        n_synthetic=len(synth_groups),
        ci=bootstrap_interval(statistic, real_groups, synth_groups, n_bootstrap, seed=seed),
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
