"""One evaluation for every bundle: real vs synthetic sets -> metrics.json, report.md and PNGs.

Items are canonical datalist items (``{"id", "t1n", "t1c", "t2w", "t2f", "label", ...}``, absolute paths).
A synthetic item is paired with the real item whose id equals its ``source_id`` (or ``condition_id``, else
its own ``id``): the real case whose mask it was generated from. Several synthetic items naming one
condition give the within-condition diversity (pairwise MS-SSIM).

Per contrast: FID and KID (feature extractor, counts, bootstrap CI), MMD, paired MS-SSIM (fidelity),
within-condition MS-SSIM (diversity), SSIM/PSNR/MAE over the brain and in the lesion (paired, BraSyn
normalisation), memorisation (with training items). Across contrasts: conditioning fidelity (with a
segmentation network). Missing contrasts are skipped with a note.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import CONTRASTS
from common.io import DataError, load_nifti, save_json
from common.metrics import distribution, memorisation, report, similarity
from common.metrics.features import build_extractor, default_device


@dataclass
class EvalConfig:
    """Settings of one evaluation (all recorded in metrics.json)."""

    extractor: str | None = "inception2d"  # inception2d | radimagenet2.5d | medicalnet3d | a TorchScript file | None
    weights: str | None = None  # local weight file of the extractor (else the torch hub cache)
    extractor_mode: str = "3d"  # for a TorchScript extractor: 2d (axial slices), 2.5d (three planes) or 3d
    extractor_options: dict = field(default_factory=dict)  # e.g. {"stride": 2} or {"input_size": 64}
    device: str | None = None  # default: cuda when present, else cpu
    contrasts: Sequence[str] = CONTRASTS
    label_scheme: str = "brats2023"  # of the real labels / conditioning masks (common.data.labels)
    percentiles: tuple[float, float] = (0.5, 99.5)  # BraSyn clipping before paired metrics and histograms
    n_bootstrap: int = 200
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    mmd_grid: tuple[int, int, int] = (64, 64, 64)  # volumes are resampled to this grid for MMD
    curves: bool = True  # FID/KID vs number of synthetic volumes
    n_montages: int = 3
    memorisation_ratio: float = 0.5
    seed: int = 0
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["contrasts"] = list(self.contrasts)
        return d


def load_items(source, sections: Sequence[str] | None = None) -> list[dict]:
    """Items from a datalist JSON (every list section unless ``sections``) or from a dataset folder."""
    from common.data.datalist import load_datalist
    from common.data.layouts import read_layout

    path = Path(source)
    if path.is_dir():
        items = read_layout(path, require_label=False)
        for it in items:  # a layout reader keeps the expected path of a missing file: here it is just absent
            it.pop("problems", None)
            for key in CONTRASTS + ("label",):
                if it.get(key) and not Path(it[key]).exists():
                    it[key] = None
        return items
    if not path.exists():
        raise DataError(path, "neither a datalist file nor a folder")
    if sections is None:
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(path, f"unreadable datalist JSON ({exc})") from exc
        sections = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if not sections:
            raise DataError(path, "datalist has no section with items")
    return load_datalist(path, sections)


def load_volume(item: dict, key: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """(3D array, voxel spacing) of ``item[key]``; MSD's 4-D files are indexed by ``<key>_channel``."""
    data, _affine, header = load_nifti(item[key])
    channel = item.get(f"{key}_channel")
    if channel is not None and data.ndim == 4:
        data = data[..., int(channel)]
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(item[key], f"expected a 3D volume for {key}, found shape {data.shape}")
    return np.ascontiguousarray(data), tuple(float(z) for z in header.get_zooms()[:3])


def condition_of(item: dict) -> str:
    return str(item.get("source_id") or item.get("condition_id") or item["id"])


def lesion_mask(label: np.ndarray, scheme: str) -> np.ndarray:
    """Tumor voxels (resection cavity included, GliomaGen's head label excluded) as a boolean mask."""
    from common.data.labels import tumor_mask

    try:
        return tumor_mask(label, scheme, include_rc=True)
    except Exception:  # unknown scheme: every non-zero label is lesion
        return np.asarray(label) > 0


def _resample(volume: np.ndarray, grid) -> torch.Tensor:
    t = torch.as_tensor(volume, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=tuple(grid), mode="trilinear", align_corners=False)[0, 0]


def _finite(obj):
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _check_items(items: Sequence[dict], what: str) -> None:
    if not items:
        raise ValueError(f"the {what} set is empty")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "id" not in it:
            raise ValueError(f"{what} item {i} has no 'id': {it!r}")


def evaluate_contrast(
    contrast: str, real_items: list[dict], synth_items: list[dict], config: EvalConfig, extractor=None,
    train_items: list[dict] | None = None, rng: np.random.Generator | None = None,
) -> tuple[dict, dict]:
    """Metrics of one contrast, plus what the pictures need (histogram samples, curves)."""
    rng = rng or np.random.default_rng(config.seed)
    real_by_id = {it["id"]: it for it in real_items}
    out: dict[str, Any] = {"n_real": len(real_items), "n_synthetic": len(synth_items)}
    extras: dict[str, Any] = {"hist_real": [], "hist_synth": []}
    notes = []
    from tqdm.auto import tqdm

    real_feats, real_small = [], []
    for it in tqdm(real_items, desc=f"real {contrast}", disable=not config.progress, leave=False):
        vol, _ = load_volume(it, contrast)
        if extractor is not None:
            real_feats.append(extractor(vol))
        norm = similarity.percentile_normalise(vol, None, config.percentiles)
        real_small.append(_resample(norm, config.mmd_grid))
        extras["hist_real"].append(report.sample_values(norm, vol != 0, 20000, rng))

    # one pass over the synthetic set; only small things are kept (features, 64^3 copies, voxel samples)
    synth_feats, synth_small, paired, fidelity, unpaired_shapes = [], [], [], [], []
    groups: dict[str, list[Callable[[], np.ndarray]]] = defaultdict(list)
    grouped = sum(1 for it in synth_items if it.get("source_id") or it.get("condition_id"))
    ms_settings = None
    for it in tqdm(synth_items, desc=f"synthetic {contrast}", disable=not config.progress, leave=False):
        vol, _ = load_volume(it, contrast)
        if extractor is not None:
            synth_feats.append(extractor(vol))
        real_item = real_by_id.get(condition_of(it))
        brain = None
        if real_item is not None and real_item.get(contrast):
            real_vol, _ = load_volume(real_item, contrast)
            if real_vol.shape == vol.shape:
                brain = real_vol != 0
                mask_item = it if it.get("label") else real_item
                lesion = lesion_mask(load_volume(mask_item, "label")[0], config.label_scheme) if mask_item.get("label") else None
                paired.append(similarity.paired_scores(vol, real_vol, brain, lesion, config.percentiles))
                ms_settings = ms_settings or similarity.ms_ssim_settings(vol.shape)
                fidelity.append(similarity.ms_ssim(
                    similarity.percentile_normalise(vol, brain, config.percentiles),
                    similarity.percentile_normalise(real_vol, brain, config.percentiles), settings=ms_settings))
            else:
                unpaired_shapes.append(f"{it['id']} {vol.shape} vs {real_item['id']} {real_vol.shape}")
        norm = similarity.percentile_normalise(vol, brain, config.percentiles)
        synth_small.append(_resample(norm, config.mmd_grid))
        extras["hist_synth"].append(report.sample_values(norm, brain if brain is not None else vol != 0, 20000, rng))
        if grouped:
            groups[condition_of(it)].append(_normalised_loader(it, contrast, config.percentiles))
    if unpaired_shapes:
        notes.append(f"{len(unpaired_shapes)} synthetic images differ in shape from their real pair and are not "
                     f"paired (e.g. {unpaired_shapes[0]})")

    if extractor is not None:
        out["extractor"] = getattr(extractor, "name", type(extractor).__name__)
        if len(real_feats) >= 2 and len(synth_feats) >= 2:
            device = getattr(extractor, "device", None)
            out["fid"] = distribution.fid_report(real_feats, synth_feats, config.n_bootstrap, config.seed, device)
            out["kid"] = distribution.kid_report(real_feats, synth_feats, config.kid_subset_size, config.kid_subsets,
                                                 config.n_bootstrap // 2, config.seed, device)
            if config.curves and len(synth_feats) >= 3:
                extras["curve"] = distribution.metric_vs_count(real_feats, synth_feats, seed=config.seed,
                                                               kid_subset_size=config.kid_subset_size, device=device)
                out["fid_vs_count"] = extras["curve"]
        else:
            notes.append("FID/KID need at least 2 real and 2 synthetic volumes")
    if len(real_small) >= 2 and len(synth_small) >= 2:
        out["mmd"] = distribution.image_mmd(real_small, synth_small, config.seed)
        out["mmd"]["grid"] = list(config.mmd_grid)

    if paired:
        keys = sorted({k for p in paired for k in p})
        by_key = {k: [p[k] for p in paired if k in p and math.isfinite(p[k])] for k in keys}
        for k in keys:
            n_inf = sum(1 for p in paired if k in p and math.isinf(p[k]))
            if n_inf:
                notes.append(f"{k}: {n_inf} pairs are identical (infinite PSNR) and left out of the mean")
        out["paired"] = {
            "n_pairs": len(paired),
            "mean": {k: float(np.mean(v)) if v else float("nan") for k, v in by_key.items()},
            "std": {k: float(np.std(v)) if v else float("nan") for k, v in by_key.items()},
            "ci": {k: _mean_ci(v, config.n_bootstrap, config.seed) for k, v in by_key.items()},
            "percentiles": list(config.percentiles),
        }
        out["ms_ssim_fidelity"] = {"mean": float(np.mean(fidelity)), "std": float(np.std(fidelity)),
                                   "n_pairs": len(fidelity), "settings": ms_settings}
    else:
        notes.append("no synthetic image has a paired real image of the same shape: paired metrics skipped")
    if grouped:
        out["ms_ssim_diversity"] = similarity.ms_ssim_diversity(groups)

    if train_items:
        train = [it for it in train_items if it.get(contrast)]
        if len(train) >= 2:
            out["memorisation"] = memorisation.nearest_neighbours(
                [_loader(it, contrast) for it in synth_items], [_loader(it, contrast) for it in train],
                [it["id"] for it in synth_items], [it["id"] for it in train], ratio=config.memorisation_ratio,
            )
        else:
            notes.append("memorisation check needs at least 2 training volumes")
    out["notes"] = notes
    return out, extras


def _loader(item: dict, key: str) -> Callable[[], np.ndarray]:
    return lambda: load_volume(item, key)[0]


def _normalised_loader(item: dict, key: str, percentiles) -> Callable[[], np.ndarray]:
    return lambda: similarity.percentile_normalise(load_volume(item, key)[0], None, percentiles)


def _mean_ci(values: Sequence[float], n_bootstrap: int, seed: int) -> dict | None:
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    v = np.asarray(values)
    means = v[rng.integers(0, len(v), (n_bootstrap, len(v)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n_bootstrap": n_bootstrap, "confidence": 0.95}


def _conditioning(synth_items, real_by_id, config: EvalConfig, segmenter, segmenter_contrasts, transform) -> dict | None:
    from common.metrics.segmentation import conditioning_fidelity

    images, masks, spacing = [], [], None
    for it in synth_items:
        mask_item = it if it.get("label") else real_by_id.get(condition_of(it))
        if mask_item is None or not mask_item.get("label") or not all(it.get(c) for c in segmenter_contrasts):
            continue
        vols = [load_volume(it, c) for c in segmenter_contrasts]
        spacing = spacing or vols[0][1]
        image = np.stack([v for v, _ in vols])
        images.append(transform(image) if transform else _zscore_channels(image))
        masks.append(load_volume(mask_item, "label")[0].astype(np.int64))
    if not images:
        return None
    return conditioning_fidelity(segmenter, images, masks, regions=config.label_scheme, spacing=spacing)


def _zscore_channels(image: np.ndarray) -> np.ndarray:
    """Channel-wise z-score on non-zero voxels (MONAI NormalizeIntensity(nonzero=True, channel_wise=True))."""
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        nz = image[c] != 0
        if nz.any():
            v = image[c][nz]
            out[c][nz] = (v - v.mean()) / max(float(v.std()), 1e-6)
    return out


def evaluate_sets(
    real_items: Sequence[dict], synth_items: Sequence[dict], out_dir, config: EvalConfig | None = None,
    train_items: Sequence[dict] | None = None, extractor=None, segmenter: Callable | None = None,
    segmenter_contrasts: Sequence[str] = CONTRASTS, segmenter_transform: Callable | None = None,
) -> dict:
    """Evaluate a synthetic set against a real one; write metrics.json, report.md and PNGs to ``out_dir``.

    ``extractor`` (a callable volume -> feature rows) overrides ``config.extractor``; ``segmenter`` (a
    network: (1, C, ...) -> logits) enables conditioning fidelity on ``segmenter_contrasts``. Outputs are
    written to a temporary folder and moved into ``out_dir`` only when everything succeeded.
    """
    config = config or EvalConfig()
    real_items, synth_items = list(real_items), list(synth_items)
    _check_items(real_items, "real")
    _check_items(synth_items, "synthetic")
    if extractor is None and config.extractor:
        kwargs = dict(config.extractor_options)
        if config.extractor not in ("inception2d", "radimagenet2.5d", "medicalnet3d"):
            kwargs.setdefault("mode", config.extractor_mode)
        extractor = build_extractor(config.extractor, weights=config.weights, device=config.device, **kwargs)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    real_by_id = {it["id"]: it for it in real_items}
    n_paired = sum(condition_of(it) in real_by_id for it in synth_items)
    metrics: dict[str, Any] = {
        "info": {"n_real": len(real_items), "n_synthetic": len(synth_items), "n_paired": n_paired,
                 "n_training": len(train_items) if train_items else 0,
                 "extractor": getattr(extractor, "name", None) if extractor is not None else None,
                 "device": str(getattr(extractor, "device", config.device or default_device()))},
        "config": config.to_dict(),
        "contrasts": {},
        "notes": [],
    }
    hist_real, hist_synth, curves = {}, {}, {}
    for contrast in config.contrasts:
        synth_c = [it for it in synth_items if it.get(contrast)]
        real_c = [it for it in real_items if it.get(contrast)]
        if not synth_c:
            metrics["notes"].append(f"{contrast}: absent from the synthetic set, skipped")
            continue
        if not real_c:
            metrics["notes"].append(f"{contrast}: absent from the real set, skipped")
            continue
        if len(synth_c) < len(synth_items):
            metrics["notes"].append(f"{contrast}: only {len(synth_c)} of {len(synth_items)} synthetic cases have it")
        m, extras = evaluate_contrast(contrast, real_c, synth_c, config, extractor, list(train_items or []), rng)
        metrics["notes"] += [f"{contrast}: {n}" for n in m.pop("notes")]
        metrics["contrasts"][contrast] = m
        hist_real[contrast] = np.concatenate(extras["hist_real"]) if extras["hist_real"] else np.zeros(0)
        hist_synth[contrast] = np.concatenate(extras["hist_synth"]) if extras["hist_synth"] else np.zeros(0)
        if "curve" in extras:
            curves[contrast] = extras["curve"]
    if not metrics["contrasts"]:
        raise ValueError(f"no contrast of {list(config.contrasts)} is present in both the real and the synthetic set")
    if segmenter is not None:
        cond = _conditioning(synth_items, real_by_id, config, segmenter, segmenter_contrasts, segmenter_transform)
        if cond is None:
            metrics["notes"].append("conditioning fidelity skipped: no synthetic case has all segmenter contrasts and a mask")
        else:
            metrics["conditioning_fidelity"] = cond
    metrics = _finite(metrics)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=out_dir))
    try:
        _write_outputs(metrics, staging, hist_real, hist_synth, curves, synth_items, real_by_id, config)
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _write_outputs(metrics, folder: Path, hist_real, hist_synth, curves, synth_items, real_by_id, config) -> None:
    files = ["metrics.json", "report.md", "histograms.png"]
    report.plot_histograms(hist_real, hist_synth, folder / "histograms.png")
    if curves:
        report.plot_metric_curves(curves, folder / "metric_vs_count.png")
        files.append("metric_vs_count.png")
    shown = 0
    for it in synth_items:
        if shown >= config.n_montages:
            break
        real_item = real_by_id.get(condition_of(it))
        contrasts = [c for c in metrics["contrasts"] if it.get(c)]
        synth = {c: load_volume(it, c)[0] for c in contrasts}
        real = {c: load_volume(real_item, c)[0] for c in contrasts if real_item and real_item.get(c)}
        if any(real[c].shape != synth[c].shape for c in real):
            real = {}
        mask_item = it if it.get("label") else real_item
        mask = load_volume(mask_item, "label")[0] if mask_item and mask_item.get("label") else None
        if mask is not None and mask.shape != next(iter(synth.values())).shape:
            mask = None
        name = f"montage_{shown:02d}_{it['id']}.png".replace(os.sep, "_")
        title = f"{it['id']} vs real {real_item['id']}" if real else str(it["id"])
        report.pairs_montage(real, synth, folder / name, mask=mask, title=title, contrasts=contrasts)
        files.append(name)
        shown += 1
    metrics["files"] = files
    report.save_text(report.markdown_report(metrics), folder / "report.md")
    save_json(metrics, folder / "metrics.json")


def evaluate_segmentations(
    predictions: Sequence[dict], references: Sequence[dict], label_scheme: str = "brats2023",
    key: str = "label", progress: bool = True,
) -> dict:
    """Downstream segmentation (e.g. nnU-Net trained on real vs real+synthetic): score predicted label files.

    ``predictions`` and ``references`` are items with an id and a ``key`` path; pairs are matched by id.
    Returns per-case scores and their mean (per label, per BraTS region, kappa, accuracy; mm distances).
    """
    from tqdm.auto import tqdm

    from common.metrics.segmentation import mean_scores, segmentation_scores

    refs = {it["id"]: it for it in references}
    missing = [it["id"] for it in predictions if it["id"] not in refs or not refs[it["id"]].get(key)]
    if missing:
        raise ValueError(f"no reference {key} for predicted cases {missing[:5]}")
    per_case = {}
    for it in tqdm(predictions, desc="segmentations", disable=not progress, leave=False):
        pred, spacing = load_volume(it, key)
        truth, _ = load_volume(refs[it["id"]], key)
        if pred.shape != truth.shape:
            raise DataError(it[key], f"prediction shape {pred.shape} differs from reference {truth.shape}")
        per_case[it["id"]] = segmentation_scores(np.rint(pred), np.rint(truth), regions=label_scheme, spacing=spacing)
    return _finite({"per_case": per_case, "mean": mean_scores(list(per_case.values())), "n_cases": len(per_case)})
