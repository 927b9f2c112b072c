"""One evaluation for every bundle: real vs synthetic sets -> metrics.json, report.md and PNGs.

Items are canonical datalist items (``{"id", "t1n", "t1c", "t2w", "t2f", "label", ...}``, absolute paths).
A synthetic item is paired with the real item whose id equals its ``source_id`` (or ``condition_id``, else
its own ``id``): the real case whose mask it was generated from. Several synthetic items naming one
condition give the within-condition diversity (pairwise MS-SSIM over a seeded, stated number of pairs).

Per contrast: FID and KID (feature extractor, counts, half-sampling CI), MMD (grid and normalisation
stated), paired MS-SSIM (fidelity), within-condition MS-SSIM (diversity), SSIM/PSNR/MAE over the brain and in
the lesion (paired, BraSyn normalisation), memorisation (with training items). Across contrasts:
conditioning fidelity (with a segmentation network). Missing contrasts are skipped with a note.

At dataset scale the work is a list of units (one real case, one synthetic case, one diversity pair), each
read, scored and dropped: only features, running MMD sums, bounded histogram samples and per-case numbers
are kept, so memory stays flat as the sets grow. Units run in parallel workers (``config.workers``) and in
shards (``evaluate_shard`` writes one shard's records; ``merge_shards`` combines them): the result does not
depend on either. FID/KID features are cached by file hash (``common.metrics.cache``).
"""

from __future__ import annotations

import hashlib
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
from common.io import DataError, check_choice, check_flag, load_nifti, save_json, torch_load, torch_save
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
    hd95_convention: str = "monai"  # monai (boundary voxels) or brats (BraTS 2023 code: area-weighted surfels)
    percentiles: tuple[float, float] = (0.5, 99.5)  # BraSyn clipping before paired metrics and histograms
    ssim: str = "standard"  # similarity.SSIM_OPTIONS: standard (11-voxel window) or w7
    ms_ssim: str = "auto"  # similarity.MS_SSIM_OPTIONS name, or auto: the largest that fits the volume
    n_bootstrap: int = 200  # bootstrap of paired means (unbiased for a mean)
    n_subsamples: int = 100  # half-sampling replicates of the FID / KID intervals
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    mmd_grid: tuple[int, int, int] = (64, 64, 64)  # volumes are resampled to this grid for MMD
    diversity_pairs: int | None = 200  # within-condition pairs drawn (seeded) for diversity; None: all
    curves: bool = True  # FID/KID vs number of synthetic volumes
    n_montages: int = 3
    memorisation_ratio: float = 0.5
    workers: int = 1  # parallel processes scoring cases
    feature_cache: str | None = "default"  # folder of the FID/KID feature cache; default: cache_dir()/features; None: off
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        """Refuse impossible settings before any image is read (a whole evaluation can take an hour)."""
        from common.data.labels import get_scheme
        from common.metrics.features import EXTRACTORS
        from common.metrics.segmentation import HD95_CONVENTIONS

        flag, choice = check_flag, check_choice
        ext = self.extractor
        flag("extractor", ext is None or ext in EXTRACTORS or Path(str(ext)).is_file(),
             f"unknown feature extractor {ext!r}: choose one of {', '.join(sorted(EXTRACTORS))}, none, or a "
             "TorchScript file that exists")
        flag("weights", self.weights is None or Path(self.weights).is_file(), f"{self.weights}: file does not exist")
        choice("extractor_mode", self.extractor_mode, ("2d", "2.5d", "3d"))
        unknown = [c for c in self.contrasts if c not in CONTRASTS]
        flag("contrasts", not unknown and len(self.contrasts) > 0,
             f"unknown contrasts {unknown}; choose from {', '.join(CONTRASTS)}")
        get_scheme(self.label_scheme)
        choice("hd95_convention", self.hd95_convention, HD95_CONVENTIONS)
        choice("ssim", self.ssim, tuple(similarity.SSIM_OPTIONS))
        choice("ms_ssim", self.ms_ssim, ("auto", *similarity.MS_SSIM_OPTIONS))
        for name in ("n_bootstrap", "n_subsamples", "n_montages"):
            flag(name, int(getattr(self, name)) >= 0, f"must be >= 0, got {getattr(self, name)}")
        for name in ("kid_subset_size", "kid_subsets", "workers"):
            flag(name, int(getattr(self, name)) >= 1, f"must be >= 1, got {getattr(self, name)}")
        flag("diversity_pairs", self.diversity_pairs is None or int(self.diversity_pairs) >= 1,
             f"must be >= 1 (or 0 / none for all pairs), got {self.diversity_pairs}")

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


def _labels_outside(label: np.ndarray, scheme: str) -> list[int]:
    from common.data.labels import get_scheme

    return sorted(int(v) for v in np.unique(label) if int(v) not in get_scheme(scheme).values)


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
        raise DataError(f"--{what}", "the set is empty (no case found)")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "id" not in it:
            raise DataError(f"--{what}", f"item {i} has no 'id': {it!r}")
    if what == "real":  # synthetic cases pair with real ones by id: a duplicated id would drop one of them
        ids = [str(it["id"]) for it in items]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise DataError(f"--real ({len(dupes)} duplicated id(s), e.g. {dupes[0]})",
                            "every real case needs its own id: pairing by id would keep only one of them")


# ---------------------------------------------------------------------------------------------- work units


@dataclass
class Plan:
    """Everything every worker and shard must agree on: the items, the contrasts and the list of units."""

    real_items: list
    synth_items: list
    contrasts: list  # evaluated contrasts (present in both sets)
    notes: list
    pairs: list  # diversity pairs (condition, synthetic index a, synthetic index b)
    n_pairs_possible: int
    n_conditions_skipped: int
    grouped: bool

    def units(self) -> list[tuple[str, int]]:
        return ([("real", i) for i in range(len(self.real_items))] + [("synth", j) for j in range(len(self.synth_items))]
                + [("pair", k) for k in range(len(self.pairs))])

    def fingerprint(self, config: EvalConfig) -> str:
        ident = {"real": self.real_items, "synthetic": self.synth_items, "contrasts": self.contrasts,
                 "config": {k: v for k, v in config.to_dict().items() if k not in ("workers", "progress", "device")}}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_plan(real_items: Sequence[dict], synth_items: Sequence[dict], config: EvalConfig) -> Plan:
    real_items, synth_items = list(real_items), list(synth_items)
    _check_items(real_items, "real")
    _check_items(synth_items, "synthetic")
    contrasts, notes = [], []
    for contrast in config.contrasts:
        n_synth = sum(1 for it in synth_items if it.get(contrast))
        if not n_synth:
            notes.append(f"{contrast}: absent from the synthetic set, skipped")
        elif not any(it.get(contrast) for it in real_items):
            notes.append(f"{contrast}: absent from the real set, skipped")
        else:
            contrasts.append(contrast)
            if n_synth < len(synth_items):
                notes.append(f"{contrast}: only {n_synth} of {len(synth_items)} synthetic cases have it")
    if not contrasts:
        raise DataError("--contrasts", f"none of {list(config.contrasts)} is present in both the real and the synthetic set")
    grouped = any(it.get("source_id") or it.get("condition_id") for it in synth_items)
    members: dict[str, list[int]] = defaultdict(list)
    for j, it in enumerate(synth_items):
        members[condition_of(it)].append(j)
    pairs, possible, skipped = [], 0, 0
    if grouped:
        sizes = {c: len(v) for c, v in members.items() if len(v) >= 2}
        skipped = sum(1 for v in members.values() if len(v) < 2)
        possible = sum(n * (n - 1) // 2 for n in sizes.values())
        pairs = [(c, members[c][a], members[c][b])
                 for c, a, b in similarity.diversity_pairs(sizes, config.diversity_pairs, config.seed)]
    return Plan(real_items, synth_items, contrasts, notes, pairs, possible, skipped, grouped)


def _hist_limit(plan: Plan) -> int:
    """Histogram voxels kept per case: about 200k per set in all, at least 2k per case."""
    return max(2000, 200_000 // max(1, len(plan.real_items), len(plan.synth_items)))


def _features(item: dict, contrast: str, vol: np.ndarray, extractor, cache) -> torch.Tensor:
    if cache is None:
        return extractor(vol)
    channel = item.get(f"{contrast}_channel")
    feats = cache.get(item[contrast], channel)
    if feats is None:
        feats = extractor(vol)
        cache.put(item[contrast], feats, channel)
    return feats


def _score_unit(unit: tuple[str, int], plan: Plan, config: EvalConfig, extractor, cache) -> dict:
    """One real case, one synthetic case or one diversity pair -> a small record (no image kept)."""
    kind, index = unit
    rng = np.random.default_rng([config.seed, ("real", "synth", "pair").index(kind), index])
    limit = _hist_limit(plan)
    record: dict[str, Any] = {"kind": kind, "index": index, "contrasts": {}}
    if kind == "pair":
        condition, a, b = plan.pairs[index]
        record["condition"] = condition
        for contrast in plan.contrasts:
            ia, ib = plan.synth_items[a], plan.synth_items[b]
            if not (ia.get(contrast) and ib.get(contrast)):
                continue
            x, y = (similarity.percentile_normalise(load_volume(it, contrast)[0], None, config.percentiles)
                    for it in (ia, ib))
            if x.shape != y.shape:
                continue
            settings = similarity.ms_ssim_option(config.ms_ssim, x.shape)
            record["contrasts"][contrast] = {"value": similarity.ms_ssim(x, y, settings=settings), "settings": settings}
        return record
    item = (plan.real_items if kind == "real" else plan.synth_items)[index]
    record["id"] = str(item["id"])
    real_by_id = {it["id"]: it for it in plan.real_items} if kind == "synth" else {}
    lesions: dict[str, Any] = {}  # the label is read once per case (shared by the contrasts)
    for contrast in plan.contrasts:
        if not item.get(contrast):
            continue
        vol, _ = load_volume(item, contrast)
        out: dict[str, Any] = {}
        if kind == "synth" and not np.any(vol):
            out["all_zero"] = True
        if extractor is not None:
            out["features"] = _features(item, contrast, vol, extractor, cache)
        brain, norm = None, None
        if kind == "synth":
            real_item = real_by_id.get(condition_of(item))
            if real_item is not None and real_item.get(contrast):
                real_vol, _ = load_volume(real_item, contrast)
                if real_vol.shape == vol.shape:
                    brain = real_vol != 0
                    if "label" not in lesions:
                        mask_item = item if item.get("label") else real_item
                        lesions["label"] = None
                        if mask_item.get("label"):
                            label = load_volume(mask_item, "label")[0]
                            lesions["label"] = lesion_mask(label, config.label_scheme)
                            outside = _labels_outside(label, config.label_scheme)
                            if outside:
                                record["labels_outside_scheme"] = outside
                    lesion = lesions["label"] if lesions["label"] is not None and \
                        lesions["label"].shape == vol.shape else None
                    # each image normalised once (on the real brain) for SSIM/PSNR/MAE, MS-SSIM, MMD, histograms
                    norm = similarity.percentile_normalise(vol, brain, config.percentiles)
                    real_norm = similarity.percentile_normalise(real_vol, brain, config.percentiles)
                    out["paired"] = similarity.normalised_paired_scores(norm, real_norm, brain, lesion, config.ssim)
                    settings = similarity.ms_ssim_option(config.ms_ssim, vol.shape)
                    out["fidelity"] = similarity.ms_ssim(norm, real_norm, settings=settings)
                    out["fidelity_settings"] = settings
                else:
                    out["unpaired"] = f"{item['id']} {vol.shape} vs {real_item['id']} {real_vol.shape}"
        if norm is None:
            norm = similarity.percentile_normalise(vol, brain, config.percentiles)
        out["small"] = _resample(norm, config.mmd_grid)
        out["hist"] = torch.as_tensor(report.sample_values(norm, brain if brain is not None else vol != 0, limit, rng))
        record["contrasts"][contrast] = out
    return record


class _Accumulator:
    """Folds records in as they arrive: MMD volumes go into running sums at once, the rest is small."""

    def __init__(self):
        self.records: list[dict] = []
        self.mmd: dict[str, dict[str, distribution.MMDSums]] = defaultdict(
            lambda: {"real": distribution.MMDSums(), "synth": distribution.MMDSums()})

    def add(self, record: dict) -> None:
        for contrast, out in record["contrasts"].items():
            small = out.pop("small", None)
            if small is not None:
                self.mmd[contrast][record["kind"]].add(small)
        self.records.append(record)

    def state(self) -> dict:
        return {"records": self.records,
                "mmd": {c: {k: vars(v) for k, v in d.items()} for c, d in self.mmd.items()}}

    def merge_state(self, state: dict) -> None:
        self.records += state["records"]
        for c, d in state["mmd"].items():
            for k, v in d.items():
                other = distribution.MMDSums()
                other.total, other.sq, other.n = v["total"], float(v["sq"]), int(v["n"])
                self.mmd[c][k].merge(other)


# worker processes: built once per process by the pool initialiser
_WORKER: dict[str, Any] = {}


def _init_worker(plan: Plan, config: EvalConfig, extractor, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(plan=plan, config=config, extractor=_make_extractor(config) if extractor is None else extractor,
                   cache=_make_cache(config, extractor))


def _run_unit(unit):
    w = _WORKER
    record = _score_unit(unit, w["plan"], w["config"], w["extractor"], w["cache"])
    cache = w["cache"]
    record["cache"] = cache.counts() if cache is not None else None
    if cache is not None:
        cache.hits = cache.misses = 0  # counts travel with each record
    return record


def _make_extractor(config: EvalConfig):
    if not config.extractor:
        return None
    kwargs = dict(config.extractor_options)
    if config.extractor not in ("inception2d", "radimagenet2.5d", "medicalnet3d"):
        kwargs.setdefault("mode", config.extractor_mode)
    return build_extractor(config.extractor, weights=config.weights, device=config.device, **kwargs)


def _make_cache(config: EvalConfig, extractor=None):
    """The feature cache of the configured extractor; an extractor object needs a ``cache_key`` attribute."""
    from common.metrics.cache import FeatureCache, extractor_key

    if config.feature_cache is None:
        return None
    if extractor is not None and not config.extractor:
        key = getattr(extractor, "cache_key", None)
        if key is None:
            return None
    elif config.extractor:
        key = extractor_key(config.extractor, config.weights,
                            {"mode": config.extractor_mode, **config.extractor_options})
    else:
        return None
    return FeatureCache(key, None if config.feature_cache == "default" else config.feature_cache)


def score_units(plan: Plan, config: EvalConfig, units: Sequence[tuple[str, int]], extractor=None) -> _Accumulator:
    """Score ``units`` (in ``config.workers`` processes when > 1) with one progress bar and ETA over all."""
    from tqdm.auto import tqdm

    acc = _Accumulator()
    cache_counts = {"hits": 0, "misses": 0, "folder": None}
    bar = tqdm(total=len(units), desc="evaluate (cases + pairs)", disable=not config.progress, unit="unit")

    def take(record):
        counts = record.pop("cache", None)
        if counts:
            cache_counts["hits"] += counts["hits"]
            cache_counts["misses"] += counts["misses"]
            cache_counts["folder"] = counts["folder"]
        acc.add(record)
        bar.update(1)

    workers = max(1, int(config.workers))
    if workers == 1 or len(units) < 2:
        _WORKER.clear()
        _WORKER.update(plan=plan, config=config, extractor=extractor if extractor is not None else _make_extractor(config),
                       cache=_make_cache(config, extractor))
        try:
            for unit in units:
                take(_run_unit(unit))
        finally:
            _WORKER.clear()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(plan, config, extractor, threads)) as pool:
            futures = [pool.submit(_run_unit, u) for u in units]
            try:
                for fut in as_completed(futures):
                    take(fut.result())
            except BaseException:  # a bad file (DataError) or Ctrl-C: do not wait for the rest of the set
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    acc.cache = cache_counts if (config.extractor or extractor is not None) else None
    return acc


# --------------------------------------------------------------------------------------------- aggregation


def _aggregate(plan: Plan, acc: _Accumulator, config: EvalConfig, extractor_name, train_items) -> tuple[dict, dict]:
    """Set-level metrics from the records (sorted, so order of arrival, workers and shards do not matter)."""
    records = sorted(acc.records, key=lambda r: (("real", "synth", "pair").index(r["kind"]), r["index"]))
    out_contrasts, extras_all, notes = {}, {}, list(plan.notes)
    for contrast in plan.contrasts:
        real = [r["contrasts"][contrast] for r in records if r["kind"] == "real" and contrast in r["contrasts"]]
        synth_recs = [r for r in records if r["kind"] == "synth" and contrast in r["contrasts"]]
        synth = [r["contrasts"][contrast] for r in synth_recs]
        out: dict[str, Any] = {"n_real": len(real), "n_synthetic": len(synth)}
        c_notes = []
        zero = [r["id"] for r in synth_recs if r["contrasts"][contrast].get("all_zero")]
        if zero:
            c_notes.append(f"{len(zero)} synthetic images are all zero (e.g. {zero[0]}): scored as they are; "
                           "check the generator's output")
        unpaired = [s["unpaired"] for s in synth if "unpaired" in s]
        if unpaired:
            c_notes.append(f"{len(unpaired)} synthetic images differ in shape from their real pair and are not "
                           f"paired (e.g. {unpaired[0]})")
        extras: dict[str, Any] = {"hist_real": [r["hist"].numpy() for r in real],
                                  "hist_synth": [s["hist"].numpy() for s in synth]}
        if extractor_name is not None:
            out["extractor"] = extractor_name
            real_feats, synth_feats = [r["features"] for r in real], [s["features"] for s in synth]
            if len(real_feats) >= 2 and len(synth_feats) >= 2:
                device = config.device
                out["fid"] = distribution.fid_report(real_feats, synth_feats, config.n_subsamples, config.seed, device)
                out["kid"] = distribution.kid_report(real_feats, synth_feats, config.kid_subset_size,
                                                     config.kid_subsets, max(2, config.n_subsamples // 2),
                                                     config.seed, device)
                if config.curves and len(synth_feats) >= 3:
                    extras["curve"] = distribution.metric_vs_count(
                        real_feats, synth_feats, seed=config.seed, kid_subset_size=config.kid_subset_size,
                        device=device)
                    out["fid_vs_count"] = extras["curve"]
            else:
                c_notes.append("FID/KID need at least 2 real and 2 synthetic volumes")
        sums = acc.mmd.get(contrast)
        if sums and sums["real"].n >= 2 and sums["synth"].n >= 2:
            out["mmd"] = distribution.mmd_report(
                sums["real"], sums["synth"], config.mmd_grid,
                f"each volume clipped to its brain's {config.percentiles[0]}-{config.percentiles[1]} percentiles, "
                f"scaled to [0, 1], resampled (trilinear) to {'x'.join(map(str, config.mmd_grid))}")
        paired = [s["paired"] for s in synth if "paired" in s]
        if paired:
            keys = sorted({k for p in paired for k in p})
            by_key = {k: [p[k] for p in paired if k in p and math.isfinite(p[k])] for k in keys}
            for k in keys:
                n_inf = sum(1 for p in paired if k in p and math.isinf(p[k]))
                if n_inf:
                    c_notes.append(f"{k}: {n_inf} pairs are identical (infinite PSNR) and left out of the mean")
            out["paired"] = {
                "n_pairs": len(paired),
                "mean": {k: float(np.mean(v)) if v else float("nan") for k, v in by_key.items()},
                "std": {k: float(np.std(v)) if v else float("nan") for k, v in by_key.items()},
                "ci": {k: _mean_ci(v, config.n_bootstrap, config.seed) for k, v in by_key.items()},
                "percentiles": list(config.percentiles),
                "ssim_definition": similarity.ssim_option(config.ssim),
            }
            fidelity = [s["fidelity"] for s in synth if "fidelity" in s]
            settings = [s["fidelity_settings"] for s in synth if "fidelity" in s]
            out["ms_ssim_fidelity"] = {"mean": float(np.mean(fidelity)), "std": float(np.std(fidelity)),
                                       "n_pairs": len(fidelity), "settings": settings[0]}
            if len({st["name"] for st in settings}) > 1:
                c_notes.append("MS-SSIM fidelity mixes settings (volumes of different sizes): set --ms_ssim")
        else:
            c_notes.append("no synthetic image has a paired real image of the same shape: paired metrics skipped")
        if plan.grouped:
            values: dict[str, list[float]] = defaultdict(list)
            settings = None
            for r in records:
                if r["kind"] == "pair" and contrast in r["contrasts"]:
                    values[r["condition"]].append(r["contrasts"][contrast]["value"])
                    settings = settings or r["contrasts"][contrast]["settings"]
            out["ms_ssim_diversity"] = similarity.summarise_diversity(
                dict(values), plan.n_pairs_possible, plan.n_conditions_skipped, settings, config.diversity_pairs,
                config.seed)
        if train_items:
            train = [it for it in train_items if it.get(contrast)]
            synth_items = [plan.synth_items[r["index"]] for r in synth_recs]
            if len(train) >= 2:
                out["memorisation"] = memorisation.nearest_neighbours(
                    [_loader(it, contrast) for it in synth_items], [_loader(it, contrast) for it in train],
                    [it["id"] for it in synth_items], [it["id"] for it in train], ratio=config.memorisation_ratio,
                )
            else:
                c_notes.append("memorisation check needs at least 2 training volumes")
        notes += [f"{contrast}: {n}" for n in c_notes]
        out_contrasts[contrast] = out
        extras_all[contrast] = extras
    outside = {r["id"]: r["labels_outside_scheme"] for r in records if r.get("labels_outside_scheme")}
    if outside:
        first = next(iter(outside))
        notes.append(f"{len(outside)} lesion masks hold labels outside {config.label_scheme} (e.g. {first}: "
                     f"{outside[first]}), counted as lesion: set --label_scheme or fix the masks")
    return out_contrasts, {"extras": extras_all, "notes": notes}


def evaluate_sets(
    real_items: Sequence[dict], synth_items: Sequence[dict], out_dir, config: EvalConfig | None = None,
    train_items: Sequence[dict] | None = None, extractor=None, segmenter: Callable | None = None,
    segmenter_contrasts: Sequence[str] = CONTRASTS, segmenter_transform: Callable | None = None,
) -> dict:
    """Evaluate a synthetic set against a real one; write metrics.json, report.md and PNGs to ``out_dir``.

    ``extractor`` (a callable volume -> feature rows) overrides ``config.extractor`` (it is cached only if it
    has a ``cache_key``; with ``config.workers > 1`` it must pickle); ``segmenter`` (a network: (1, C, ...) ->
    logits) enables conditioning fidelity on ``segmenter_contrasts``. Outputs are written to a temporary
    folder and moved into ``out_dir`` only when everything succeeded.
    """
    config = config or EvalConfig()
    plan = make_plan(real_items, synth_items, config)
    if extractor is None and config.extractor and config.workers <= 1:
        extractor = _make_extractor(config)  # fail early (missing weights) before any case is read
    torch.manual_seed(config.seed)
    acc = score_units(plan, config, plan.units(), extractor)
    return _finish(plan, acc, out_dir, config, train_items, extractor, segmenter, segmenter_contrasts,
                   segmenter_transform)


def _extractor_name(config: EvalConfig, extractor) -> str | None:
    if extractor is not None:
        return getattr(extractor, "name", type(extractor).__name__)
    if config.extractor:
        return Path(config.extractor).name if Path(config.extractor).is_file() else config.extractor
    return None


def _finish(plan: Plan, acc: _Accumulator, out_dir, config: EvalConfig, train_items, extractor, segmenter,
            segmenter_contrasts, segmenter_transform, shards: int = 1) -> dict:
    name = _extractor_name(config, extractor)
    contrasts, agg = _aggregate(plan, acc, config, name, list(train_items or []))
    real_by_id = {it["id"]: it for it in plan.real_items}
    n_paired = sum(condition_of(it) in real_by_id for it in plan.synth_items)
    metrics: dict[str, Any] = {
        "info": {"n_real": len(plan.real_items), "n_synthetic": len(plan.synth_items), "n_paired": n_paired,
                 "n_training": len(train_items) if train_items else 0, "extractor": name,
                 "device": str(getattr(extractor, "device", config.device or default_device())),
                 "workers": config.workers, "shards": shards,
                 "ssim": similarity.describe_ssim(similarity.ssim_option(config.ssim))},
        "feature_cache": getattr(acc, "cache", None),
        "config": config.to_dict(),
        "contrasts": contrasts,
        "notes": agg["notes"],
    }
    if segmenter is not None:
        cond = _conditioning(plan.synth_items, real_by_id, config, segmenter, segmenter_contrasts, segmenter_transform)
        if cond is None:
            metrics["notes"].append("conditioning fidelity skipped: no synthetic case has all segmenter contrasts and a mask")
        else:
            metrics["conditioning_fidelity"] = cond
    metrics = _finite(metrics)
    extras = agg["extras"]
    hist_real = {c: np.concatenate(e["hist_real"]) if e["hist_real"] else np.zeros(0) for c, e in extras.items()}
    hist_synth = {c: np.concatenate(e["hist_synth"]) if e["hist_synth"] else np.zeros(0) for c, e in extras.items()}
    curves = {c: e["curve"] for c, e in extras.items() if "curve" in e}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluate-", dir=out_dir))
    try:
        _write_outputs(metrics, staging, hist_real, hist_synth, curves, plan.synth_items, real_by_id, config)
        for path in sorted(staging.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


# ------------------------------------------------------------------------------------------------- shards


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise DataError("--shard", f"expected i/n (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise DataError("--shard", f"need 0 <= i < n, got {shard!r}")
    return i, n


def shard_path(out_dir, i: int, n: int) -> Path:
    return Path(out_dir) / "shards" / f"shard-{i}-of-{n}.pt"


def evaluate_shard(real_items, synth_items, out_dir, shard: str, config: EvalConfig | None = None,
                   extractor=None) -> Path:
    """Score every n-th unit (cases and diversity pairs) and write the records to ``out_dir/shards/``."""
    config = config or EvalConfig()
    i, n = parse_shard(shard)
    plan = make_plan(real_items, synth_items, config)
    units = plan.units()[i::n]
    acc = score_units(plan, config, units, extractor)
    state = {"fingerprint": plan.fingerprint(config), "shard": [i, n], "n_units": len(units),
             "cache": acc.cache, **acc.state()}
    return torch_save(state, shard_path(out_dir, i, n))


def merge_shards(real_items, synth_items, out_dir, config: EvalConfig | None = None, train_items=None,
                 extractor=None, segmenter=None, segmenter_contrasts: Sequence[str] = CONTRASTS,
                 segmenter_transform=None) -> dict:
    """Combine ``out_dir/shards/shard-*-of-n.pt`` (all n, same items and settings) into the full report."""
    config = config or EvalConfig()
    plan = make_plan(real_items, synth_items, config)
    files = sorted((Path(out_dir) / "shards").glob("shard-*-of-*.pt"))
    if not files:
        raise DataError(Path(out_dir) / "shards", "no shard files (run with --shard i/n first)")
    counts = {int(f.stem.rsplit("-of-", 1)[1]) for f in files}
    if len(counts) != 1:
        raise DataError(Path(out_dir) / "shards", f"shards of different splits {sorted(counts)}: keep one")
    n = counts.pop()
    missing = [i for i in range(n) if not shard_path(out_dir, i, n).exists()]
    if missing:
        raise DataError(Path(out_dir) / "shards", f"shards {missing} of {n} are missing: run --shard i/{n} for them")
    acc = _Accumulator()
    cache = {"hits": 0, "misses": 0, "folder": None}
    fingerprint = plan.fingerprint(config)
    for i in range(n):
        path = shard_path(out_dir, i, n)
        state = torch_load(path)
        if state["fingerprint"] != fingerprint:
            raise DataError(path, "written for other items or settings than this merge: rerun the shard")
        acc.merge_state(state)
        if state.get("cache"):
            cache["hits"] += state["cache"]["hits"]
            cache["misses"] += state["cache"]["misses"]
            cache["folder"] = state["cache"]["folder"]
    if len(acc.records) != len(plan.units()):
        raise DataError(Path(out_dir) / "shards", f"{len(acc.records)} records for {len(plan.units())} units")
    acc.cache = cache if config.extractor or extractor is not None else None
    return _finish(plan, acc, out_dir, config, train_items, extractor, segmenter, segmenter_contrasts,
                   segmenter_transform, shards=n)


def _loader(item: dict, key: str) -> Callable[[], np.ndarray]:
    return lambda: load_volume(item, key)[0]


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
    return conditioning_fidelity(segmenter, images, masks, regions=config.label_scheme, spacing=spacing,
                                 hd95_convention=config.hd95_convention)


def _zscore_channels(image: np.ndarray) -> np.ndarray:
    """Channel-wise z-score on non-zero voxels (MONAI NormalizeIntensity(nonzero=True, channel_wise=True))."""
    out = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        nz = image[c] != 0
        if nz.any():
            v = image[c][nz]
            out[c][nz] = (v - v.mean()) / max(float(v.std()), 1e-6)
    return out


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
    key: str = "label", progress: bool = True, hd95_convention: str = "monai",
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
        per_case[it["id"]] = segmentation_scores(np.rint(pred), np.rint(truth), regions=label_scheme, spacing=spacing,
                                                 hd95_convention=hd95_convention)
    return _finite({"per_case": per_case, "mean": mean_scores(list(per_case.values())), "n_cases": len(per_case),
                    "hd95_convention": hd95_convention})
