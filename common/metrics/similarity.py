"""Paired image similarity: SSIM/PSNR/MAE over the brain and inside the lesion, and MS-SSIM twice.

Intensities are first clipped to the 0.5-99.5 brain percentiles and scaled to [0, 1], as in the BraTS
missing-modality (BraSyn) challenge, so ``data_range`` is 1 and numbers compare across contrasts. Masks are
always booleans (an integer label map is never used as an index). SSIM and MS-SSIM use the separable kernel
of ``common.ops`` with the standard definitions by default; the other settings are named options
(``SSIM_OPTIONS``, ``MS_SSIM_OPTIONS``) that every report prints beside its value.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from common.ops.ssim import MS_SSIM_WEIGHTS


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


# Named SSIM windows. "standard" is the literature's and MONAI's / scikit-image's; "w7" is this project's
# former 7-voxel window, kept so older figures can be reproduced. Both drop the border where the window does
# not fit (no zero padding); a region's SSIM is the whole-image map averaged over the region's voxels.
SSIM_OPTIONS = {
    "standard": {"kernel_size": 11, "sigma": 1.5},
    "w7": {"kernel_size": 7, "sigma": 1.5},
}

# Named MS-SSIM settings, largest first. "standard" is Wang et al. 2003 / MONAI's default (5 scales,
# 11-voxel window: every side >= 176). The others keep the first weights renormalised, for the volumes of the
# papers here (128x128x64, 96^3, 64^3); they are fixed, so values compare across volume sizes that fit them.
MS_SSIM_OPTIONS = {
    "standard": {"kernel_size": 11, "sigma": 1.5, "n_scales": 5},
    "3-scale": {"kernel_size": 11, "sigma": 1.5, "n_scales": 3},
    "3-scale-w7": {"kernel_size": 7, "sigma": 1.5, "n_scales": 3},
    "2-scale-w5": {"kernel_size": 5, "sigma": 1.5, "n_scales": 2},
}


def ssim_option(name: str = "standard") -> dict:
    if name not in SSIM_OPTIONS:
        raise ValueError(f"unknown SSIM option {name!r}: choose one of {sorted(SSIM_OPTIONS)}")
    o = SSIM_OPTIONS[name]
    return {"name": name, **o, "k1": 0.01, "k2": 0.03, "border": "valid (no padding)",
            "region": "whole-image SSIM map averaged over the region"}


def ms_ssim_option(name: str = "standard", shape: Sequence[int] | None = None) -> dict:
    """Settings of a named MS-SSIM option (``"auto"``: the largest that fits ``shape``), weights included."""
    from common.ops import ms_ssim_min_size

    if name == "auto":
        if shape is None:
            raise ValueError("ms_ssim option 'auto' needs the image shape")
        for candidate, o in MS_SSIM_OPTIONS.items():
            if min(shape) >= ms_ssim_min_size(o["kernel_size"], o["n_scales"]):
                return ms_ssim_option(candidate)
        raise ValueError(f"image of shape {tuple(shape)} is too small for any MS-SSIM option {list(MS_SSIM_OPTIONS)}")
    if name not in MS_SSIM_OPTIONS:
        raise ValueError(f"unknown MS-SSIM option {name!r}: choose auto or one of {list(MS_SSIM_OPTIONS)}")
    o = MS_SSIM_OPTIONS[name]
    w = np.asarray(MS_SSIM_WEIGHTS[: o["n_scales"]], dtype=np.float64)
    weights = MS_SSIM_WEIGHTS if o["n_scales"] == len(MS_SSIM_WEIGHTS) else tuple((w / w.sum()).tolist())
    return {"name": name, **o, "weights": tuple(weights),
            "min_side": ms_ssim_min_size(o["kernel_size"], o["n_scales"])}


def describe_ssim(option: dict) -> str:
    """One short line a report prints beside an SSIM value."""
    return f"{option['name']}: {option['kernel_size']}-voxel Gaussian window, sigma {option['sigma']}, valid border"


def describe_ms_ssim(option: dict) -> str:
    return f"{option['name']}: {option['n_scales']} scales, {option['kernel_size']}-voxel window"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def ssim_map(pred, target, data_range: float = 1.0, option: str = "standard") -> np.ndarray:
    """Voxel-wise SSIM (``common.ops.ssim_map``) over the valid region: each side shorter by the window - 1."""
    from common.ops import ssim_map as kernel

    o = ssim_option(option)
    return kernel(_tensor(pred), _tensor(target), data_range, o["kernel_size"], o["sigma"])[0, 0].cpu().numpy()


def ssim(pred, target, mask=None, data_range: float = 1.0, option: str = "standard") -> float:
    """Mean SSIM; with a mask, the whole-image SSIM map averaged over the mask's voxels.

    The images are not zeroed outside the mask (that would give both the same artificial edge and inflate
    the score); mask voxels within half a window of the image border are not counted (valid region).
    NaN when no mask voxel lies in the valid region.
    """
    from common.ops import ssim as kernel

    pred, target = np.asarray(pred, dtype=np.float32), np.asarray(target, dtype=np.float32)
    if pred.shape != target.shape:
        raise ValueError(f"SSIM needs images of one shape, got {pred.shape} and {target.shape}")
    o = ssim_option(option)
    m = None
    if mask is not None:
        m = torch.as_tensor(as_bool_mask(mask, pred.shape))[None, None]
        if not m.any():
            return float("nan")
    return float(kernel(_tensor(pred), _tensor(target), data_range, o["kernel_size"], o["sigma"], mask=m))


def ssim_regions(pred, target, masks: dict, data_range: float = 1.0, option: str = "standard",
                 device=None) -> dict[str, float]:
    """SSIM of one image pair averaged over several regions from one SSIM map (computed once)."""
    from common.ops import crop_valid, ssim_map as kernel

    o = ssim_option(option)
    device = device or _device()
    smap = kernel(_tensor(pred).to(device), _tensor(target).to(device), data_range, o["kernel_size"], o["sigma"])
    out = {}
    for name, mask in masks.items():
        m = crop_valid(torch.as_tensor(as_bool_mask(mask, np.shape(pred)))[None, None].to(device), o["kernel_size"])
        count = int(m.sum())
        out[name] = float(torch.where(m, smap, 0).sum(dtype=torch.float64)) / count if count else float("nan")
    return out


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


def paired_scores(synthetic, real, brain_mask=None, lesion_mask=None, percentiles=(0.5, 99.5),
                  ssim_option_name: str = "standard", device=None) -> dict:
    """SSIM/PSNR/MAE of one synthetic image against its paired real one, whole brain and inside the lesion.

    Both are normalised to [0, 1] on the brain (BraSyn); SSIM is one whole-image map averaged per region.
    """
    real = np.asarray(real, dtype=np.float32)
    brain = as_bool_mask(brain_mask, real.shape, "brain mask") if brain_mask is not None else real != 0
    s = percentile_normalise(synthetic, brain, percentiles)
    r = percentile_normalise(real, brain, percentiles)
    return normalised_paired_scores(s, r, brain, lesion_mask, ssim_option_name, device)


def normalised_paired_scores(s, r, brain, lesion_mask=None, ssim_option_name: str = "standard", device=None) -> dict:
    """``paired_scores`` of images already normalised to [0, 1] (each image is normalised once per evaluation)."""
    brain = as_bool_mask(brain, r.shape, "brain mask")
    regions = {"brain": brain}
    lesion = None
    if lesion_mask is not None:
        lesion = as_bool_mask(lesion_mask, r.shape, "lesion mask")
        if lesion.any():
            regions["lesion"] = lesion
    ssims = ssim_regions(s, r, regions, option=ssim_option_name, device=device)
    out = {"ssim_brain": ssims["brain"], "psnr_brain": psnr(s, r, brain), "mae_brain": mae(s, r, brain)}
    if "lesion" in regions:
        out.update(ssim_lesion=ssims["lesion"], psnr_lesion=psnr(s, r, lesion), mae_lesion=mae(s, r, lesion))
    return out


def ms_ssim_settings(shape: Sequence[int], option: str = "auto") -> dict:
    """The named MS-SSIM option used for images of this shape (``"auto"``: the largest that fits)."""
    return ms_ssim_option(option, shape)


def ms_ssim(a, b, data_range: float = 1.0, settings: dict | str | None = None, device=None) -> float:
    """MS-SSIM (``common.ops.ms_ssim``) between two images of one shape; ``settings``: an option dict or name."""
    from common.ops import ms_ssim as kernel

    x, y = _tensor(a), _tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"MS-SSIM needs images of one shape, got {tuple(x.shape[2:])} and {tuple(y.shape[2:])}")
    if settings is None or isinstance(settings, str):
        settings = ms_ssim_option(settings or "auto", x.shape[2:])
    device = device or _device()
    value = kernel(x.to(device), y.to(device), data_range, settings["kernel_size"], settings.get("sigma", 1.5),
                   weights=settings["weights"])
    return float(value)


def ms_ssim_fidelity(synthetic: Sequence, real: Sequence, option: str = "auto") -> dict:
    """Paired MS-SSIM (synthetic vs the real image it was generated for): higher = closer to its pair."""
    if len(synthetic) != len(real) or not synthetic:
        raise ValueError(f"need equally many paired images, got {len(synthetic)} synthetic and {len(real)} real")
    settings = ms_ssim_option(option, np.asarray(real[0]).shape)
    values = [ms_ssim(s, r, settings=settings) for s, r in zip(synthetic, real)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n_pairs": len(values),
            "settings": settings}


def diversity_pairs(groups: dict[str, int], max_pairs: int | None = 200, seed: int = 0) -> list[tuple[str, int, int]]:
    """(condition, i, j) pairs of samples within each condition: every pair, or ``max_pairs`` drawn uniformly
    (seeded) from all of them, so the cost stays bounded however many samples a condition has."""
    every = [(c, i, j) for c, n in sorted(groups.items()) for i, j in itertools.combinations(range(n), 2)]
    if max_pairs is None or len(every) <= max_pairs:
        return every
    rng = np.random.default_rng(seed)
    return [every[k] for k in sorted(rng.choice(len(every), int(max_pairs), replace=False))]


def summarise_diversity(values: dict[str, list[float]], n_total_pairs: int, n_skipped: int, settings, max_pairs,
                        seed: int) -> dict:
    """Mean pairwise MS-SSIM per condition, then over conditions, with the pair counts it rests on."""
    per_condition = {c: float(np.mean(v)) for c, v in values.items() if v}
    base = {"n_pairs": int(sum(len(v) for v in values.values())), "n_pairs_possible": int(n_total_pairs),
            "max_pairs": max_pairs, "seed": seed, "n_conditions_skipped": n_skipped, "settings": settings}
    if not per_condition:
        return {"mean": None, "n_conditions": 0, **base, "note": "no condition has two or more samples"}
    vals = list(per_condition.values())
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n_conditions": len(vals), **base}


def ms_ssim_diversity(groups: dict[str, Sequence], max_pairs: int | None = 200, seed: int = 0,
                      option: str = "auto") -> dict:
    """Pairwise MS-SSIM among samples generated from one condition, averaged per condition then overall.

    Lower = more diverse. At most ``max_pairs`` pairs (seeded draw over all within-condition pairs; the number
    used and possible are reported). Conditions with a single sample are skipped (``n_conditions_skipped``).
    Samples may be arrays or zero-argument loaders (each is loaded once, when first needed).
    """
    sizes = {c: len(v) for c, v in groups.items() if len(v) >= 2}
    skipped = sum(1 for v in groups.values() if len(v) < 2)
    pairs = diversity_pairs(sizes, max_pairs, seed)
    n_total = sum(n * (n - 1) // 2 for n in sizes.values())
    values: dict[str, list[float]] = {}
    settings, cache, current = None, {}, None
    for condition, i, j in pairs:  # pairs come grouped by condition: one condition in memory at a time
        if condition != current:
            cache, current = {}, condition
        for k in (i, j):
            if k not in cache:
                v = groups[condition][k]
                cache[k] = np.asarray(v() if callable(v) else v)
        settings = settings or ms_ssim_option(option, cache[i].shape)
        values.setdefault(condition, []).append(ms_ssim(cache[i], cache[j], settings=settings))
    return summarise_diversity(values, n_total, skipped, settings, max_pairs, seed)
