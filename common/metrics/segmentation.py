"""Segmentation scores (Dice, HD95, ASSD per label and BraTS region; Cohen's kappa, accuracy) and
conditioning fidelity (segment generated images, compare with the mask they were conditioned on).

Distances are in millimetres when a spacing is given. HD95 has two named conventions (``hd95_convention``):
"monai" (default): MONAI's ``compute_hausdorff_distance`` at the 95th percentile, the larger of the two
directed 95th percentiles over boundary *voxels*; "brats": the BraTS 2023 metrics code's, DeepMind
``surface-distance`` ``compute_robust_hausdorff(..., 95)`` over area-weighted *surfels* (lower by up to about
half a millimetre on tumour-sized structures). ASSD is MONAI's symmetric ``compute_average_surface_distance``.
Empty structures follow the BraTS convention: both empty -> Dice 1 and distance 0; only one empty -> Dice 0
and the distance is the image diagonal (the largest possible; BraTS uses 374 mm, the 240x240x155 diagonal).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch


def region_values(scheme: str) -> dict[str, tuple[int, ...]]:
    """Label values of each BraTS region (ET/TC/WT, + RC) in a label scheme of ``common.data.labels``."""
    from common.data.labels import REGION_COMPARTMENTS, get_scheme

    s = get_scheme(scheme)
    out = {name: tuple(s.value_of[c] for c in comps if s.has(c)) for name, comps in REGION_COMPARTMENTS.items()}
    if s.has("RC"):
        out["RC"] = (s.value_of["RC"],)
    return {k: v for k, v in out.items() if v}


def _binary(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=bool))[None, None].float()


HD95_CONVENTIONS = ("monai", "brats")


def hd95_brats(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """HD95 as the BraTS 2023 metrics code computes it (DeepMind ``surface-distance``, area-weighted surfels)."""
    try:
        import surface_distance
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        raise ImportError("hd95_convention='brats' needs the surface-distance package (pip install surface-distance)") from exc
    sp = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * np.ndim(pred)))
    distances = surface_distance.compute_surface_distances(np.asarray(truth, bool), np.asarray(pred, bool), sp)
    return float(surface_distance.compute_robust_hausdorff(distances, 95))


def binary_scores(pred, truth, spacing: Sequence[float] | None = None, hd95_convention: str = "monai") -> dict:
    """Dice, HD95 and ASSD of two boolean masks (MONAI), with BraTS handling of empty masks."""
    if hd95_convention not in HD95_CONVENTIONS:
        raise ValueError(f"hd95_convention must be one of {HD95_CONVENTIONS}, got {hd95_convention!r}")
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {t.shape}")
    sp = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    diagonal = float(np.sqrt(np.sum((np.asarray(p.shape) * sp) ** 2)))
    if not p.any() and not t.any():
        return {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    if not p.any() or not t.any():
        return {"dice": 0.0, "hd95": diagonal, "assd": diagonal}
    tp, tt = _binary(p), _binary(t)
    spacing_arg = None if spacing is None else [float(s) for s in spacing]
    dice = compute_dice(tp, tt, include_background=True, ignore_empty=False)
    if hd95_convention == "brats":
        hd95 = hd95_brats(p, t, spacing)
    else:
        hd95 = float(compute_hausdorff_distance(tp, tt, include_background=True, percentile=95,
                                                spacing=spacing_arg).item())
    assd = compute_average_surface_distance(tp, tt, include_background=True, symmetric=True, spacing=spacing_arg)
    return {"dice": float(dice.item()), "hd95": hd95, "assd": float(assd.item())}


def cohen_kappa(pred, truth) -> float:
    """Voxel-wise multi-class Cohen's kappa: agreement beyond what the label frequencies give by chance."""
    p, t = np.asarray(pred).ravel().astype(np.int64), np.asarray(truth).ravel().astype(np.int64)
    labels = np.union1d(np.unique(p), np.unique(t))
    observed = float(np.mean(p == t))
    expected = float(sum(np.mean(p == k) * np.mean(t == k) for k in labels))
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def segmentation_scores(
    pred, truth, labels: Sequence[int] | None = None, regions: str | Mapping[str, Sequence[int]] | None = "brats2023",
    spacing: Sequence[float] | None = None, hd95_convention: str = "monai",
) -> dict:
    """Scores of one predicted label map against its reference: per label, per region, kappa, accuracy.

    ``labels`` defaults to every non-zero label found in either map; ``regions`` names a label scheme of
    ``common.data.labels`` (brats2019, brats2023, brats2024, msd, six_label) or maps region names to label
    values (None: no regions).
    """
    p, t = np.asarray(pred).astype(np.int64), np.asarray(truth).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {t.shape}")
    if labels is None:
        labels = [int(v) for v in np.union1d(np.unique(p), np.unique(t)) if v != 0]
    region_map = region_values(regions) if isinstance(regions, str) else (regions or {})
    return {
        "per_label": {str(k): binary_scores(p == k, t == k, spacing, hd95_convention) for k in labels},
        "per_region": {name: binary_scores(np.isin(p, vals), np.isin(t, vals), spacing, hd95_convention)
                       for name, vals in region_map.items()},
        "kappa": cohen_kappa(p, t),
        "accuracy": float(np.mean(p == t)),
    }


def mean_scores(cases: Sequence[dict]) -> dict:
    """Average a list of nested score dicts key by key (NaNs ignored), keeping the nesting."""
    if not cases:
        return {}
    out = {}
    for key, value in cases[0].items():
        if isinstance(value, dict):
            out[key] = mean_scores([c[key] for c in cases if key in c])
        elif isinstance(value, (int, float)):
            vals = np.asarray([c[key] for c in cases if key in c], dtype=float)
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


@torch.no_grad()
def segment(segmenter: Callable, image: np.ndarray, device=None, inferer: Callable | None = None) -> np.ndarray:
    """Label map of a (C, *spatial) image from a network returning logits (1, K, ...) or labels (1, 1, ...)."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]
    if device is None and isinstance(segmenter, torch.nn.Module):  # run where the network's weights live
        device = next((p.device for p in segmenter.parameters()), None)
    if device is not None:
        x = x.to(device)
    out = inferer(x, segmenter) if inferer is not None else segmenter(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    labels = out.argmax(1) if out.shape[1] > 1 else out[:, 0].round()
    return labels[0].cpu().numpy().astype(np.int64)


def conditioning_fidelity(
    segmenter: Callable, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
    regions: str | Mapping[str, Sequence[int]] | None = "brats2023", spacing=None, device=None,
    inferer: Callable | None = None, hd95_convention: str = "monai",
) -> dict:
    """Segment every generated image and score it against the mask it was generated from (mean over cases)."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"need one conditioning mask per image, got {len(images)} images and {len(masks)} masks")
    cases = [segmentation_scores(segment(segmenter, img, device, inferer), m, regions=regions, spacing=spacing,
                                 hd95_convention=hd95_convention)
             for img, m in zip(images, masks)]
    return {"mean": mean_scores(cases), "n_cases": len(cases), "hd95_convention": hd95_convention}
