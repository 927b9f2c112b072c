"""GliomaGen's 6-label condition masks and their augmentation (more plausible masks -> more synthetic cases).

The condition (``six_label`` in ``common.data.labels``): 0 background, 1 head, 2 NETC, 3 SNFH, 4 ET, 5 RC.
The head is derived from the images (``common.data.transforms.AddHeadLabeld``: non-zero voxels of any contrast,
closed and hole-filled); going back to BraTS labels drops it (``from_six_label``).

Augmentation (``augment_mask``) draws a new mask from a real one by MONAI's flip, affine and elastic transforms
(nearest interpolation, whole mask, inside the head's padded bounding box), a translation and resizing of the tumor inside the head, and a one-voxel
growth or shrinkage of the edema (SNFH). Each draw is cleaned (stray components merged into their
surroundings, head holes filled) and must pass ``check_mask``; rejected draws are redrawn, at most
``max_tries`` times, and counted.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.data.labels import check_labels, convert_labels, get_scheme
from common.io import DataError, check_output, load_nifti, save_json, save_nifti

SCHEME = "six_label"
HEAD, NETC, SNFH, ET, RC = (get_scheme(SCHEME).value_of[c] for c in ("head", "NETC", "SNFH", "ET", "RC"))
TUMOR = (NETC, SNFH, ET, RC)
NAMES = {v: c for v, c in get_scheme(SCHEME).values.items()}


# ----------------------------------------------------------------------------------------------- 6-label condition


def to_six_label(seg, images, src_scheme: str = "brats2024", threshold: float = 0.0, where="label") -> np.ndarray:
    """BraTS mask (``src_scheme``) + its images ``[C, X, Y, Z]`` (or a list of 3-D volumes) -> 6-label mask.

    ``threshold``: a voxel is head where any contrast exceeds it; 0 suits skull-stripped BraTS scans (background
    exactly 0); raw scans with noise in the air need a higher one.
    """
    from common.data.transforms import AddHeadLabeld

    images = np.stack([np.asarray(v, dtype=np.float32) for v in images]) if isinstance(images, (list, tuple)) \
        else np.asarray(images, dtype=np.float32)
    seg = np.asarray(seg)
    if seg.ndim != 3 or images.shape[1:] != seg.shape:
        raise DataError(where, f"mask shape {seg.shape} does not match the images' {images.shape[1:]}")
    add = AddHeadLabeld(image_key="image", src_scheme=src_scheme, threshold=threshold)
    return np.asarray(add({"image": images, "label": seg[None], "id": str(where)})["label"][0], dtype=np.uint8)


def from_six_label(labels, dst_scheme: str = "brats2024", where="label") -> np.ndarray:
    """6-label mask -> BraTS labels for writing ``-seg`` (head becomes background; RC needs a scheme with RC)."""
    return convert_labels(labels, SCHEME, dst_scheme, where=where)


def head_region(labels: np.ndarray) -> np.ndarray:
    """Head + tumor (labels > 0), closed and hole-filled exactly as ``AddHeadLabeld`` derives the head."""
    from common.data.transforms import AddHeadLabeld

    return AddHeadLabeld().head_mask((np.asarray(labels) > 0)[None].astype(np.float32))


# ----------------------------------------------------------------------------------------------- validity


def _depth(region: np.ndarray) -> np.ndarray:
    """Distance (voxels) of each region voxel to the nearest voxel outside it; the array border counts as outside."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]


def _neighbours(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask) & ~mask


def _exposure(labels: np.ndarray, part: np.ndarray) -> float:
    """Share of the voxels just outside ``part`` that are head tissue (1: nothing of the tumor around it)."""
    ring = labels[_neighbours(part)]
    return float(np.mean(ring == HEAD)) if ring.size else 0.0


def tumor_depth(labels: np.ndarray) -> float:
    """How deep the tumor lies inside the head: its smallest distance (voxels) to the outside."""
    labels = np.asarray(labels)
    tumor = np.isin(labels, TUMOR)
    return float(_depth(labels > 0)[tumor].min()) if tumor.any() else float("inf")


def input_problems(labels, max_outside: float = 0.5) -> list[str]:
    """What makes a real mask unusable as a source: not 3-D, labels outside the scheme, no head, no tumor, or a
    tumor outside the head (more than ``max_outside`` of the voxels around it are background)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        return [f"not a 3-D label volume (shape {labels.shape})"]
    try:
        values = set(check_labels(labels, SCHEME).tolist())
    except DataError as err:
        return [err.problem]
    problems = []
    if HEAD not in values:
        problems.append("no head label (1): derive it from the images first (to_six_label)")
    tumor = np.isin(labels, TUMOR)
    if not tumor.any():
        problems.append("no tumor voxel (labels 2-5)")
    elif HEAD in values:
        ring = labels[_neighbours(tumor)]
        outside = float(np.mean(ring == 0)) if ring.size else 0.0
        if outside > max_outside:
            problems.append(f"tumor outside the head ({outside:.0%} of the voxels around it are background)")
    return problems


def check_mask(
    labels, margin: int = 1, min_size: int = 8, max_exposure: float = 0.6, max_head_parts: int = 1
) -> list[str]:
    """Problems of a 6-label mask (empty list: valid). Every mask ``augment_masks`` writes passes this.

    * the problems of ``input_problems`` (3-D, scheme, head, tumor present and inside the head);
    * the head (labels > 0) in at most ``max_head_parts`` connected pieces and without holes;
    * the tumor at more than ``margin`` voxels from the outside of the head;
    * no stray voxels: every connected piece of a tumor compartment has at least ``min_size`` voxels;
    * nesting as in BraTS: the tumor core (ET + NETC) enclosed by the whole tumor and NETC inside the core, i.e.
      at most ``max_exposure`` of the voxels around each is head tissue.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    problems = input_problems(labels)
    if labels.ndim != 3 or not np.isin(labels, TUMOR).any() or not (labels == HEAD).any():
        return problems  # nothing more to measure (also: labels outside the scheme)
    region = labels > 0
    _, parts = ndimage.label(region)
    if parts > max_head_parts:
        problems.append(f"head in {parts} disconnected pieces (stray head voxels)")
    holes = int((ndimage.binary_fill_holes(region) & ~region).sum())
    if holes:
        problems.append(f"{holes} background voxels enclosed by the head (holes)")
    tumor = np.isin(labels, TUMOR)
    shallow = int((tumor & (_depth(region) <= margin)).sum())
    if shallow:
        problems.append(f"{shallow} tumor voxels within {margin} voxel(s) of the head's outside")
    for value in TUMOR:
        lab, n = ndimage.label(labels == value)
        if n:
            small = int((np.bincount(lab.ravel())[1:] < min_size).sum())
            if small:
                problems.append(f"stray voxels: {small} piece(s) of {NAMES[value]} smaller than {min_size} voxels")
    for part, what in ((np.isin(labels, (ET, NETC)), "tumor core not enclosed by the whole tumor"),
                       (labels == NETC, "NETC outside the tumor core")):
        exposed = _exposure(labels, part) if part.any() else 0.0
        if exposed > max_exposure:
            problems.append(f"{what} ({exposed:.0%} of it borders head)")
    return problems


# ----------------------------------------------------------------------------------------------- augmentation


@dataclass
class AugmentConfig:
    """Ranges of one augmentation draw (voxels and radians; MONAI transform arguments)."""

    flip_prob: float = 0.5  # left-right (axis 0)
    rotate: float = 0.17  # +- radians per axis (about 10 degrees)
    scale: float = 0.1  # whole mask: factor in 1 +- scale
    elastic: float = 0.04  # smooth displacement up to 2 % of the box size per axis (about 3 voxels at BraTS size)
    elastic_points: int = 5  # control points per axis of the elastic field
    translate: float = 0.1  # tumor shift: +- this fraction of the head's extent per axis
    tumor_scale: tuple[float, float] = (0.85, 1.15)  # tumor resizing about its centroid
    snfh_change: int = 1  # edema grown or shrunk by up to this many voxels
    margin: int = 2  # tumor at least this deep inside the head (relaxed to the source mask's own depth)
    min_size: int = 8  # smaller compartment pieces are stray voxels
    max_tries: int = 20  # redraws per requested mask


def _spatial(labels: np.ndarray, cfg: AugmentConfig, seed: int) -> np.ndarray:
    """Left-right flip, rotation + scaling, then a smooth elastic field (MONAI, nearest). The elastic field is
    drawn on a coarse control grid and upsampled (``RandSmoothDeform``): at BraTS size about 10x faster than
    ``Rand3DElastic``'s full-grid Gaussian smoothing, for the same kind of smooth deformation."""
    import torch
    from monai.transforms import Compose, RandAffine, RandFlip, RandSmoothDeform

    chain = Compose([
        RandFlip(prob=cfg.flip_prob, spatial_axis=0),
        RandAffine(prob=1.0, rotate_range=(cfg.rotate,) * 3, scale_range=(cfg.scale,) * 3, mode="nearest",
                   padding_mode="zeros"),
        RandSmoothDeform(spatial_size=labels.shape, rand_size=(cfg.elastic_points,) * 3, field_mode="trilinear",
                         align_corners=True, prob=1.0, def_range=cfg.elastic, grid_mode="nearest",
                         grid_padding_mode="zeros"),
    ])
    chain.set_random_state(seed=seed)
    out = chain(torch.as_tensor(labels[None].astype(np.float32)))
    return np.asarray(out[0]).round().astype(np.uint8)


def _head_box(labels: np.ndarray, pad_frac: float = 0.15, pad_min: int = 4) -> tuple[slice, ...]:
    """The head's bounding box with room for rotation, scaling and deformation: every draw works inside it
    (2-3x fewer voxels than a BraTS grid; the array outside stays background)."""
    idx = np.argwhere(labels > 0)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    pad = np.maximum(pad_min, np.ceil(pad_frac * (hi - lo))).astype(int)
    lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad, labels.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _move_tumor(labels: np.ndarray, shift: np.ndarray, scale: float) -> np.ndarray:
    """Tumor compartments moved by ``shift`` voxels and scaled by ``scale`` about their centroid (MONAI Affine)."""
    import torch
    from monai.transforms import Affine

    tumor = np.where(np.isin(labels, TUMOR), labels, 0)
    c = np.argwhere(tumor > 0).mean(axis=0)
    m = (np.asarray(labels.shape) - 1) / 2.0
    inv = np.eye(4)  # Affine maps output -> input coordinates, centred on the array centre
    inv[:3, :3] /= scale
    inv[:3, 3] = (m - c - shift) / scale + (c - m)
    moved = Affine(affine=inv, mode="nearest", padding_mode="zeros", image_only=True)(
        torch.as_tensor(tumor[None].astype(np.float32)))
    return np.asarray(moved[0]).round().astype(np.uint8)


def _resize_edema(labels: np.ndarray, change: int) -> np.ndarray:
    from scipy import ndimage

    out = labels.copy()
    whole = np.isin(out, (NETC, SNFH, ET))
    if change > 0:
        grown = ndimage.binary_dilation(whole, iterations=change) & (out == HEAD)
        out[grown] = SNFH
    elif change < 0:
        rim = (out == SNFH) & ~ndimage.binary_erosion(whole, iterations=-change) & \
            ndimage.binary_dilation(out == HEAD, iterations=-change)
        out[rim] = HEAD
    return out


def clean_mask(labels: np.ndarray, min_size: int = 8) -> np.ndarray:
    """Merge stray pieces (< ``min_size`` voxels) of each tumor compartment into the nearest other label, keep
    the largest piece of the head and fill its holes."""
    from scipy import ndimage

    out = np.asarray(labels).astype(np.uint8).copy()
    stray = np.zeros(out.shape, bool)
    for value in TUMOR:
        lab, n = ndimage.label(out == value)
        if n:
            sizes = np.bincount(lab.ravel())
            small = np.flatnonzero(sizes < min_size)
            stray |= np.isin(lab, small[small > 0])
    if stray.any():
        idx = ndimage.distance_transform_edt(stray, return_distances=False, return_indices=True)
        out[stray] = out[tuple(i[stray] for i in idx)]
    lab, n = ndimage.label(out > 0)
    if n > 1:
        keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
        out[(lab > 0) & (lab != keep)] = 0
    out[head_region(out) & (out == 0)] = HEAD
    return out


def _draw(labels: np.ndarray, cfg: AugmentConfig, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = _spatial(labels, cfg, int(rng.integers(2**31)))
    region = out > 0
    if not np.isin(out, TUMOR).any():
        return out
    idx = np.argwhere(region)
    extent = idx.max(axis=0) - idx.min(axis=0) + 1
    shift = rng.uniform(-cfg.translate, cfg.translate, 3) * extent
    moved = _move_tumor(out, shift, float(rng.uniform(*cfg.tumor_scale)))
    out = np.where(region, HEAD, 0).astype(np.uint8)
    out[moved > 0] = moved[moved > 0]
    if cfg.snfh_change:
        out = _resize_edema(out, int(rng.integers(-cfg.snfh_change, cfg.snfh_change + 1)))
    return clean_mask(out, cfg.min_size)


def draw_seed(seed: int, case_id: str, draw: int, attempt: int) -> int:
    return zlib.crc32(f"{int(seed)}:{case_id}:{draw}:{attempt}".encode()) & 0x7FFFFFFF


def augment_mask(
    labels: np.ndarray, n: int = 2, seed: int = 0, case_id: str = "mask", config: AugmentConfig | None = None
) -> tuple[list[np.ndarray], dict]:
    """``n`` valid augmentations of a 6-label mask, and counts of the draws (``tries``, ``rejected``, reasons).

    The margin required is ``config.margin`` voxels, or less when the source tumor itself lies shallower.
    A mask that still fails after ``max_tries`` draws is left out and counted under ``failed``.
    """
    cfg = config or AugmentConfig()
    labels = np.asarray(labels).astype(np.uint8)
    margin = int(max(0, min(cfg.margin, tumor_depth(labels) - 1)))
    box = _head_box(labels)
    masks, reasons = [], Counter()
    tries = failed = 0
    for j in range(int(n)):
        for attempt in range(cfg.max_tries):
            tries += 1
            new = _draw(labels[box], cfg, draw_seed(seed, case_id, j, attempt))
            problems = check_mask(new, margin=margin, min_size=cfg.min_size)  # the box has background all round
            if not problems:
                full = np.zeros_like(labels)
                full[box] = new
                masks.append(full)
                break
            reasons.update(re.sub(r"\d+(\.\d+)?%?", "N", p) for p in problems)
        else:
            failed += 1
    stats = {"tries": tries, "accepted": len(masks), "rejected": tries - len(masks), "failed": failed,
             "margin": margin, "reasons": dict(reasons)}
    return masks, stats


# ----------------------------------------------------------------------------------------------- files


def augmented_id(case_id: str, index: int) -> str:
    """``BraTS-GLI-02000-100`` -> ``BraTS-GLIAUGAA-02000-100`` (still a BraTS 2024 id); other ids get ``-augN``."""
    from common.data.layouts import _letters

    m = re.match(r"^(BraTS-[A-Z]+)-(\d{5}-\d{3})$", case_id)
    return f"{m.group(1)}AUG{_letters(index, 2)}-{m.group(2)}" if m else f"{case_id}-aug{index}"


def _read_source(src: dict, scheme: str, threshold: float) -> tuple[np.ndarray, np.ndarray, object]:
    """One source -> (6-label mask, affine, header); ``DataError`` naming the file for any input problem."""
    from common import CONTRASTS

    path = Path(src["path"])
    data, affine, header = load_nifti(path, dtype=None)
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if src.get("item") is not None:
        if data.ndim != 3:
            raise DataError(path, f"not a 3-D label volume (shape {data.shape})")
        data = to_six_label(data, [load_nifti(src["item"][c])[0] for c in CONTRASTS], scheme, threshold, path)
    problems = input_problems(data)
    if problems:
        raise DataError(path, "; ".join(problems))
    return data.astype(np.uint8), affine, header


def find_source_masks(source, scheme: str = SCHEME, threshold: float = 0.0) -> list[dict]:
    """Find and check every source mask -> ``[{"id", "path", "item"}]`` (no voxels kept: 2000 BraTS masks
    would need 19 GB).

    ``scheme="six_label"``: ``source`` is a mask file, a folder of masks or a datalist. Any other scheme:
    ``source`` is a dataset (any layout ``common.data.layouts`` reads) and the head comes from each case's
    images (``to_six_label``). Every bad mask is reported at once (``DataError`` naming each file).
    """
    if get_scheme(scheme).name == SCHEME:
        from common.generation.sources import collect_masks

        sources = [{"id": case_id, "path": str(path), "item": None} for case_id, path in collect_masks(source)]
    else:
        from common.data.layouts import read_layout

        sources = [{"id": it["id"], "path": str(it["label"]), "item": it} for it in read_layout(source)]
    errors = []
    for src in sources:
        try:
            _read_source(src, scheme, threshold)
        except DataError as err:
            errors.append(err)
    if errors:
        lines = "\n".join(f"  {e.where}: {e.problem}" for e in errors)
        raise DataError(errors[0].where if len(errors) == 1 else source,
                        f"{len(errors)} bad mask(s), nothing written:\n{lines}")
    return sources


def _augment_source(task: tuple) -> dict:
    """Augment one source and write its masks and preview (one worker's job); returns its summary record."""
    src, out, n, seed, cfg, scheme, threshold, previews = task
    labels, affine, header = _read_source(src, scheme, threshold)
    masks, stats = augment_mask(labels, n, seed, src["id"], cfg)
    names = []
    for j, m in enumerate(masks):
        new_id = augmented_id(src["id"], j)
        save_nifti(m, affine, Path(out) / f"{new_id}-seg.nii.gz", header=header, dtype=np.uint8)
        names.append(new_id)
    if previews:
        from common.viz import mask_center, save_montage

        tumor = np.isin(labels, TUMOR)
        panels = {"original": labels, **{f"augmented {j + 1}": m for j, m in enumerate(masks)}}
        save_montage(panels, Path(out) / "previews" / f"{src['id']}.png", mask=tumor, affine=affine,
                     center=mask_center(tumor, tumor.shape),
                     title=f"{src['id']}: 6-label mask and {len(masks)} augmentation(s)")
    return {"id": src["id"], "source": src["path"], "outputs": names, **stats}


def _single_thread_worker() -> None:
    import torch

    torch.set_num_threads(1)


def augment_masks(
    source, out, n: int = 2, seed: int = 0, scheme: str = SCHEME, config: AugmentConfig | None = None,
    previews: bool = True, progress: bool = True, threshold: float = 0.0, workers: int = 1,
) -> dict:
    """Write ``n`` augmentations of every source mask to ``out`` (``<new id>-seg.nii.gz``, 6 labels, the source's
    affine and header), a preview PNG per source (``previews/<id>.png``: original next to its augmentations,
    original tumor outlined) and ``augment_masks.json`` (per source: outputs, draws, rejections and reasons).
    ``workers`` processes share the sources; every draw's seed depends only on ``seed``, the case and the draw,
    so the files are the same for any number of workers."""
    cfg = config or AugmentConfig()
    if int(n) < 1:
        raise DataError("--n", f"new masks per source mask must be >= 1, got {n}")
    if int(workers) < 1:
        raise DataError("--workers", f"must be >= 1, got {workers}")
    out = check_output(out, "dir", flag="out")
    sources = find_source_masks(source, scheme, threshold)  # every input checked before anything is written
    tasks = [(src, str(out), int(n), int(seed), cfg, scheme, threshold, previews) for src in sources]
    summary = {"n_per_mask": int(n), "seed": int(seed), "config": asdict(cfg), "scheme": SCHEME, "cases": {}}
    from tqdm.auto import tqdm

    records = []
    with tqdm(total=len(tasks), unit="mask", desc="augment-masks", disable=not progress) as bar:
        if int(workers) <= 1:
            for task in tasks:
                records.append(_augment_source(task))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx,
                                     initializer=_single_thread_worker) as pool:
                for future in as_completed([pool.submit(_augment_source, t) for t in tasks]):
                    records.append(future.result())
                    bar.update(1)
    for rec in sorted(records, key=lambda r: r["id"]):
        summary["cases"][rec.pop("id")] = rec
    cases = summary["cases"].values()
    summary.update(written=sum(len(c["outputs"]) for c in cases), rejected=sum(c["rejected"] for c in cases),
                   failed=sum(c["failed"] for c in cases))
    save_json(summary, out / "augment_masks.json")
    return summary
