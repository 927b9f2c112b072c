"""Paired image similarity: SSIM/PSNR/MAE over the brain and inside the lesion, and MS-SSIM twice.

Intensities are first clipped to the 0.5-99.5 brain percentiles and scaled to [0, 1], as in the BraTS
missing-modality (BraSyn) challenge, so ``data_range`` is 1 and numbers compare across contrasts. Masks are
always booleans (an integer label map is never used as an index).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def as_bool_mask(mask, shape=None, name: str = "mask") -> np.ndarray:
    """Any label map -> boolean foreground (labels > 0), with a shape check naming the mask."""
    m = np.asarray(mask)
    m = m.astype(bool) if m.dtype == bool else m > 0
    if shape is not None and m.shape != tuple(shape):
        raise ValueError(f"{name} shape {m.shape} differs from image shape {tuple(shape)}")
    return m


def percentile_normalise(image, mask=None, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip to the given percentiles of the brain (mask, else non-zero voxels) and scale to [0, 1]."""
    img = np.asarray(image, dtype=np.float32)
    region = as_bool_mask(mask, img.shape) if mask is not None else img != 0
    values = img[region] if region.any() else img.ravel()
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        return np.zeros_like(img)
    return np.clip((img - lo) / (hi - lo), 0, 1).astype(np.float32)


def _tensor(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return t[None, None]


def ssim_map(pred, target, data_range: float = 1.0, win_size: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Voxel-wise SSIM (MONAI's ``compute_ssim_and_cs``) on a zero-padded image, same shape as the input."""
    from monai.metrics.regression import compute_ssim_and_cs

    p, t = _tensor(pred), _tensor(target)
    dims = p.ndim - 2
    win = min(win_size, *[s if s % 2 else s - 1 for s in p.shape[2:]])
    pad = [win // 2] * (2 * dims)
    p, t = F.pad(p, pad), F.pad(t, pad)
    ssim, _ = compute_ssim_and_cs(p, t, dims, data_range=data_range, kernel_type="gaussian",
                                  kernel_size=(win,) * dims, kernel_sigma=(sigma,) * dims)
    return ssim[0, 0].numpy()


def ssim(pred, target, mask=None, data_range: float = 1.0, win_size: int = 7) -> float:
    """Mean SSIM; with a mask both images are zeroed outside it and only mask voxels are averaged.

    Zeroing first makes the value independent of anything outside the mask (the in-lesion SSIM of the
    cGAN imputation paper and BraSyn); without a mask the whole image counts.
    """
    pred, target = np.asarray(pred, dtype=np.float32), np.asarray(target, dtype=np.float32)
    if pred.shape != target.shape:
        raise ValueError(f"SSIM needs images of one shape, got {pred.shape} and {target.shape}")
    if mask is None:
        return float(ssim_map(pred, target, data_range, win_size).mean())
    m = as_bool_mask(mask, pred.shape)
    if not m.any():
        return float("nan")
    smap = ssim_map(pred * m, target * m, data_range, win_size)
    return float(smap[m].mean())


def psnr(pred, target, mask=None, data_range: float = 1.0) -> float:
    """PSNR in dB (MONAI's ``PSNRMetric`` for the whole image, the same formula restricted to a mask)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if mask is None:
        from monai.metrics import PSNRMetric

        return float(PSNRMetric(max_val=data_range)(_tensor(pred).double(), _tensor(target).double()).item())
    m = as_bool_mask(mask, pred.shape)
    if not m.any():
        return float("nan")
    mse = float(np.mean((pred[m] - target[m]) ** 2))
    return float("inf") if mse == 0 else float(20 * np.log10(data_range) - 10 * np.log10(mse))


def mae(pred, target, mask=None) -> float:
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if mask is None:
        return float(np.mean(np.abs(pred - target)))
    m = as_bool_mask(mask, pred.shape)
    return float(np.mean(np.abs(pred[m] - target[m]))) if m.any() else float("nan")


def paired_scores(synthetic, real, brain_mask=None, lesion_mask=None, percentiles=(0.5, 99.5)) -> dict:
    """SSIM/PSNR/MAE of one synthetic image against its paired real one, whole brain and inside the lesion."""
    real = np.asarray(real, dtype=np.float32)
    brain = as_bool_mask(brain_mask, real.shape, "brain mask") if brain_mask is not None else real != 0
    s = percentile_normalise(synthetic, brain, percentiles)
    r = percentile_normalise(real, brain, percentiles)
    out = {"ssim_brain": ssim(s, r, brain), "psnr_brain": psnr(s, r, brain), "mae_brain": mae(s, r, brain)}
    if lesion_mask is not None:
        lesion = as_bool_mask(lesion_mask, real.shape, "lesion mask")
        if lesion.any():
            out.update(ssim_lesion=ssim(s, r, lesion), psnr_lesion=psnr(s, r, lesion), mae_lesion=mae(s, r, lesion))
    return out


def ms_ssim_settings(shape: Sequence[int], kernel_size: int = 11, n_scales: int = 5) -> dict:
    """Largest kernel and number of scales that MONAI's MS-SSIM accepts for this image size.

    MONAI requires side // (n_scales - 1)**2 > kernel_size - 1 (its defaults need > 160 voxels a side);
    small volumes get fewer scales (the first standard weights, renormalised) and a smaller kernel.
    """
    smallest = min(shape)
    for scales in range(n_scales, 0, -1):
        for k in range(kernel_size, 2, -2):
            # MONAI's own check, and the coarsest scale must still hold a whole kernel
            if smallest // max(1, scales - 1) ** 2 > k - 1 and smallest // 2 ** (scales - 1) >= k:
                w = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
                return {"kernel_size": k, "weights": tuple((w / w.sum()).tolist()), "n_scales": scales}
    raise ValueError(f"image of shape {tuple(shape)} is too small for MS-SSIM")


def ms_ssim(a, b, data_range: float = 1.0, settings: dict | None = None) -> float:
    """MS-SSIM (MONAI ``compute_ms_ssim``) between two images of one shape, with size-adapted settings."""
    from monai.metrics.regression import compute_ms_ssim

    x, y = _tensor(a), _tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"MS-SSIM needs images of one shape, got {tuple(x.shape[2:])} and {tuple(y.shape[2:])}")
    settings = settings or ms_ssim_settings(x.shape[2:])
    dims = x.ndim - 2
    value = compute_ms_ssim(x, y, dims, data_range=data_range, kernel_size=settings["kernel_size"],
                            weights=settings["weights"])
    return float(value.item())


def ms_ssim_fidelity(synthetic: Sequence, real: Sequence) -> dict:
    """Paired MS-SSIM (synthetic vs the real image it was generated for): higher = closer to its pair."""
    if len(synthetic) != len(real) or not synthetic:
        raise ValueError(f"need equally many paired images, got {len(synthetic)} synthetic and {len(real)} real")
    settings = ms_ssim_settings(np.asarray(real[0]).shape)
    values = [ms_ssim(s, r, settings=settings) for s, r in zip(synthetic, real)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n_pairs": len(values),
            "settings": settings}


def ms_ssim_diversity(groups: dict[str, Sequence]) -> dict:
    """Pairwise MS-SSIM among samples generated from one condition, averaged per condition then overall.

    Lower = more diverse. Conditions with a single sample are skipped (counted in ``n_conditions_skipped``).
    Samples may be arrays or zero-argument loaders.
    """
    per_condition, n_pairs, skipped, settings = {}, 0, 0, None
    for condition, samples in groups.items():
        if len(samples) < 2:
            skipped += 1
            continue
        samples = [s() if callable(s) else s for s in samples]  # loaders: one condition in memory at a time
        settings = settings or ms_ssim_settings(np.asarray(samples[0]).shape)
        vals = [ms_ssim(x, y, settings=settings) for x, y in itertools.combinations(samples, 2)]
        per_condition[condition] = float(np.mean(vals))
        n_pairs += len(vals)
    if not per_condition:
        return {"mean": None, "n_conditions": 0, "n_pairs": 0, "n_conditions_skipped": skipped,
                "note": "no condition has two or more samples"}
    vals = list(per_condition.values())
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n_conditions": len(vals),
            "n_pairs": n_pairs, "n_conditions_skipped": skipped, "settings": settings}
