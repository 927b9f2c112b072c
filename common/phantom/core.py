"""generate_case: one phantom head with glioma(s) and its four contrasts; make_phantoms: a BraTS-like folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.io import DataError, check_output

from . import anatomy as an
from .fields import random_field, ramp
from .mri import TISSUE_NAMES, Protocol, add_rician_noise, jitter_tissues, signals, tissue_signals
from .tumor import GRADES, COMPARTMENTS, Lesion, lesion_fractions, push_back, push_extent, sample_lesions

CONTRAST_KEYS = ("t1n", "t1c", "t2w", "t2f")
DEFAULT_SHAPE = (240, 240, 155)
SMALL_SHAPE = (96, 96, 64)
LABELS = {"netc": 1, "snfh": 2, "et": 3, "rc": 4}
"""Label codes of PhantomCase.label (the BraTS 2024 scheme; 0 = background)."""
HGG_FRACTION = 0.7
POST_TREATMENT_LAYOUTS = ("brats2024",)


@dataclass
class PhantomCase:
    images: dict[str, np.ndarray]  # "t1n","t1c","t2w","t2f" -> float32 (X, Y, Z)
    label: np.ndarray  # uint8, BraTS 2024 scheme: 0 bg, 1 NETC, 2 SNFH, 3 ET, 4 RC
    brain_mask: np.ndarray  # bool, brain parenchyma + CSF inside the skull (tumour included)
    head_mask: np.ndarray  # bool, everything inside the skin
    affine: np.ndarray  # 4x4, BraTS/SRI24 orientation, spacing = field of view / shape
    grade: str  # "HGG" | "LGG"
    seed: int
    tissue_label: np.ndarray = None  # uint8, dominant tissue per voxel, names in TISSUE_NAMES
    lesions: list[dict] = field(default_factory=list)
    post_treatment: bool = False


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise DataError("--shape", f"phantom shape must be three integers, got {shape!r}") from None
    if len(out) != 3 or min(out) < 16:
        raise DataError("--shape", f"phantom shape must be three integers >= 16, got {shape!r}")
    return out


def _check_grade(grade) -> str | None:
    if grade is None:
        return None
    g = str(grade).upper()
    if g not in GRADES:
        raise ValueError(f"grade must be one of {GRADES} or None, got {grade!r}")
    return g


def generate_case(
    seed: int,
    grade: str | None = None,
    shape=DEFAULT_SHAPE,
    post_treatment: bool = False,
    tumor: bool = True,
) -> PhantomCase:
    """One deterministic phantom: same ``seed`` -> same head, tumour, protocol and noise.

    ``tumor=False`` gives the same head without lesions (every random stream is separate), which is what
    the mass-effect check compares against. A smaller ``shape`` keeps the 240x240x155 mm field of view.
    """
    shape = _check_shape(shape)
    grade = _check_grade(grade)
    if int(seed) < 0:
        raise DataError("--seed", f"must be >= 0, got {seed}")
    # BLAS results can depend on its thread count; one thread makes a case bit-identical everywhere
    with _single_thread_blas():
        return _generate(int(seed), grade, shape, bool(post_treatment), bool(tumor))


def _single_thread_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - nilearn's scikit-learn brings it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _generate(seed: int, grade: str | None, shape, post_treatment: bool, tumor: bool) -> PhantomCase:
    rng_anat, rng_tumor, rng_tissue, rng_noise, _, rng_head = _streams(seed)
    grade = grade or default_grade(seed)

    spacing = an.grid_spacing(shape)
    voxel = float(np.prod(spacing) ** (1 / 3))
    axes = an.grid_axes_mm(shape)
    geom = an.CaseGeometry.random(rng_anat)
    tpl = an.templates()
    gm_t, wm_t = an.brain_maps_for_spacing(tuple(np.round(spacing, 2)))
    tissues = jitter_tissues(rng_tissue)
    protocol = Protocol.random(rng_tissue)

    # --- lesions: centres at deep white-matter sites of this case's brain
    lesions: list[Lesion] = []
    if tumor:
        sites = (tpl.tumor_sites - geom.offset) @ np.linalg.inv(geom.linear).T
        lesions = sample_lesions(rng_tumor, grade, post_treatment, sites)

    # --- every output voxel of the head box mapped to template space; then lesions push tissue aside
    hb = _head_box(geom, axes, shape)
    h_axes = tuple(a[s] for a, s in zip(axes, hb))
    h_shape = tuple(len(a) for a in h_axes)
    deform = geom.deformation(h_axes)
    q = _to_template(geom, _frame_points(h_axes), deform)
    dist = an.sample_template(tpl.sdist, q, an.sdist_origin(), "nearest")
    dist *= np.float32(geom.scale)  # template mm -> this patient's mm
    boxes = [_intersect(_box(les.centre, push_extent(les), shape, spacing), hb) for les in lesions if les.push > 0.05]
    boxes = [b for b in boxes if b is not None]
    if boxes:
        rel = _relative(_union_box(boxes), hb)
        pts = _frame_points(tuple(a[s] for a, s in zip(h_axes, rel)))
        stiffness = np.clip((-dist[rel] - 2.0) / 12.0, 0.0, 1.0)
        for les in lesions:
            push_back(pts, les, stiffness)
        q_sub = _to_template(geom, pts, [d[rel] for d in deform])
        q[(slice(None),) + rel] = q_sub
        dist[rel] = an.sample_template(tpl.sdist, q_sub, an.sdist_origin(), "nearest") * np.float32(geom.scale)
        del pts, q_sub, stiffness
    del deform

    # --- brain tissue fractions inside the brain box (sub-box of the head box)
    bb_rel = _bbox(dist < voxel, margin=1)
    bb = tuple(slice(h.start + r.start, h.start + r.stop) for h, r in zip(hb, bb_rel))
    qb = q[(slice(None),) + bb_rel]
    gm = an.sample_template(gm_t, qb, an.TEMPLATE_ORIGIN_MM, "constant")
    wm = an.sample_template(wm_t, qb, an.TEMPLATE_ORIGIN_MM, "constant")
    del qb
    brain = 1.0 - ramp(dist[bb_rel], voxel)
    np.minimum(gm, brain, out=gm)
    np.minimum(wm, brain - gm, out=wm)
    csf = np.clip(brain - gm - wm, 0.0, None)
    band, head_layers, head_outer = _head_layers(rng_head, q, dist, h_axes, voxel)
    del q

    # --- tumour compartments (union box of all lesions, inside the brain box)
    label_b = np.zeros(brain.shape, np.uint8)
    tumour = None
    if lesions:
        tumour = _tumour(lesions, shape, spacing, voxel, axes, bb, gm, wm, csf, brain, label_b)

    # --- signal: sum over tissues of fraction x signal, with small anatomical texture
    sig = tissue_signals(tissues, protocol)
    codes = {n: i for i, n in enumerate(TISSUE_NAMES)}
    img_h = {c: np.zeros(h_shape, np.float32) for c in CONTRAST_KEYS}
    best_h = np.zeros(h_shape, np.float32)
    tissue_h = np.zeros(h_shape, np.uint8)
    band_best = np.zeros(band.shape, np.float32)
    band_tissue = np.zeros(band.shape, np.uint8)
    band_img = {c: np.zeros(band.shape, np.float32) for c in CONTRAST_KEYS}
    for name, frac in head_layers.items():
        tname = "csf" if name == "csf_shell" else name
        for c in CONTRAST_KEYS:
            band_img[c] += frac * np.float32(sig[tname][c])
        _update_argmax(frac, codes[tname], band_best, band_tissue)
    for c in CONTRAST_KEYS:
        img_h[c].reshape(-1)[band] = band_img.pop(c)
    best_h.reshape(-1)[band] = band_best
    tissue_h.reshape(-1)[band] = band_tissue
    del head_layers, band_best, band_tissue
    img_b = {c: img_h[c][bb_rel] for c in CONTRAST_KEYS}
    best_b, tissue_b = best_h[bb_rel], tissue_h[bb_rel]
    for name, frac in (("csf", csf), ("gm", gm), ("wm", wm)):
        for c in CONTRAST_KEYS:
            img_b[c] += frac * np.float32(sig[name][c])
        _update_argmax(frac, codes[name], best_b, tissue_b)
    if tumour is not None:
        tsl, comp, t_axes = tumour
        het = random_field(rng_tissue, t_axes, 4.0, 3)
        for name in COMPARTMENTS:
            frac = comp[name]
            if not frac.any():
                continue
            t = tissues[name]
            gd = t.gd * np.exp(0.35 * het[2]) if name == "et" else t.gd
            s = signals(t.pd, t.t1 * np.exp(0.04 * het[0]), t.t2 * np.exp(0.10 * het[1]), gd, protocol)
            for c in CONTRAST_KEYS:
                img_b[c][tsl] += frac * s[c].astype(np.float32)
            _update_argmax(frac, codes[name], best_b[tsl], tissue_b[tsl])
    del best_h, best_b, gm, wm, csf
    texture = random_field(rng_head, h_axes, 5.0, 1)[0]
    texture *= np.float32(0.025)
    texture += np.float32(1.0)
    bias = _bias_fields(rng_noise, h_axes)
    for c in CONTRAST_KEYS:
        img_h[c] *= texture
        img_h[c] *= bias[c]
    del texture, bias

    brain_mask = np.zeros(shape, bool)
    brain_mask[bb] = brain >= 0.5
    head_mask = np.zeros(shape, bool)
    head_box_mask = np.zeros(h_shape, bool)
    head_box_mask.reshape(-1)[band] = dist.reshape(-1)[band] < head_outer
    head_box_mask |= dist <= -voxel  # the brain interior is not part of the band
    head_mask[hb] = head_box_mask
    head_mask |= brain_mask
    label = np.zeros(shape, np.uint8)
    label[bb] = label_b
    label[~brain_mask] = 0
    tissue_label = np.zeros(shape, np.uint8)
    tissue_label[hb] = tissue_h
    del dist, head_outer, brain, head_box_mask

    # --- acquisition: Rician noise everywhere (Rayleigh in air), scanner gain
    gains = {"t1": rng_noise.uniform(300, 900), "t2w": rng_noise.uniform(300, 900), "t2f": rng_noise.uniform(300, 900)}
    images = {}
    for c in CONTRAST_KEYS:
        ref = sig["wm"][c]
        snr = rng_noise.uniform(18, 40) if c != "t2f" else rng_noise.uniform(14, 28)
        img = np.zeros(shape, np.float32)
        img[hb] = img_h.pop(c)
        img = add_rician_noise(img, np.float32(ref / snr), rng_noise)
        gain = gains["t1"] if c in ("t1n", "t1c") else gains[c]
        img *= np.float32(gain / ref)
        images[c] = np.rint(img, out=img)  # scanners store integers

    affine = an.brats_affine(shape)
    info = []
    for les in lesions:
        vox = les.centre / spacing - 0.5
        info.append(
            {
                "kind": les.kind,
                "centre_voxel": [float(v) for v in vox],
                "centre_mm": [float(v) for v in (affine @ np.append(vox, 1.0))[:3]],
                "r_core_mm": round(les.r_core, 2),
                "r_edema_mm": round(les.r_edema, 2),
                "push_mm": round(les.push, 2),
            }
        )
    return PhantomCase(
        images=images,
        label=label,
        brain_mask=brain_mask,
        head_mask=head_mask,
        affine=affine,
        grade=grade,
        seed=int(seed),
        tissue_label=tissue_label,
        lesions=info,
        post_treatment=bool(post_treatment),
    )


def _frame_points(axes_mm) -> list[np.ndarray]:
    shape = tuple(len(a) for a in axes_mm)
    pts = [np.empty(shape, np.float32) for _ in range(3)]
    pts[0][...] = axes_mm[0][:, None, None]
    pts[1][...] = axes_mm[1][None, :, None]
    pts[2][...] = axes_mm[2][None, None, :]
    return pts


def _to_template(geom, pts, deform) -> np.ndarray:
    """Frame mm -> MNI mm, (3, ...) float32: inverse affine, hemisphere asymmetry, smooth deformation."""
    q = np.empty((3,) + pts[0].shape, np.float32)
    lin = geom.linear.astype(np.float32)
    for i in range(3):
        np.multiply(pts[0], lin[i, 0], out=q[i])
        q[i] += lin[i, 1] * pts[1]
        q[i] += lin[i, 2] * pts[2]
        q[i] += np.float32(geom.offset[i])
    q[0] *= 1.0 + np.float32(geom.asymmetry) * np.tanh(q[0] * np.float32(1 / 15.0))
    for i in range(3):
        q[i] += deform[i]
    return q


def _tumour(lesions, shape, spacing, voxel, axes, bb, gm, wm, csf, brain, label_b):
    """Lesion compartments in the brain box; replaces / oedematises normal tissue in place and labels it."""
    boxes = [_intersect(_box(l.centre, l.extent_mm, shape, spacing), bb) for l in lesions]
    live = [(l, b) for l, b in zip(lesions, boxes) if b is not None]
    if not live:
        return None
    ub = _union_box([b for _, b in live])
    tsl = _relative(ub, bb)
    t_axes = tuple(a[s] for a, s in zip(axes, ub))
    comp = {k: np.zeros(tuple(len(a) for a in t_axes), np.float32) for k in COMPARTMENTS}
    g, w, f, b = gm[tsl], wm[tsl], csf[tsl], brain[tsl]
    par = g + w
    wm_ratio = w / np.maximum(par, 1e-3)
    for les, box in live:
        rel = _relative(box, ub)
        fr = lesion_fractions(les, tuple(a[s] for a, s in zip(axes, box)), wm_ratio[rel], voxel)
        for k in COMPARTMENTS:
            np.maximum(comp[k][rel], fr[k], out=comp[k][rel])
    core_keys = ("necrosis", "netc", "et", "cavity")
    core = sum(comp[k] for k in core_keys)
    scale = b / np.maximum(core, 1.0)  # tumour exists only inside the brain
    for k in core_keys:
        comp[k] *= scale
    core = sum(comp[k] for k in core_keys)
    keep = 1.0 - core / np.maximum(b, 1e-3)
    g *= keep
    w *= keep
    f *= keep
    edema_region = comp["edema"]
    comp["edema"] = edema_region * (g + w)
    g *= 1.0 - edema_region
    w *= 1.0 - edema_region
    # labels: core compartments where they dominate, oedema where parenchyma is oedematous
    lab = label_b[tsl]
    is_core = core >= 0.5
    core_stack = np.stack([comp["necrosis"] + comp["netc"], comp["et"], comp["cavity"]])
    core_codes = np.array([LABELS["netc"], LABELS["et"], LABELS["rc"]], np.uint8)
    lab[is_core] = core_codes[np.argmax(core_stack[:, is_core], axis=0)]
    lab[~is_core & (edema_region >= 0.5) & (par >= 0.35) & (b >= 0.5)] = LABELS["snfh"]
    return tsl, comp, t_axes


def _head_box(geom, axes, shape) -> tuple[slice, ...]:
    """Array box holding the whole head, from a coarse look-up (every ~6 mm) of the distance to the brain."""
    tpl = an.templates()
    coarse = [a[:: max(1, int(round(6.0 / (a[1] - a[0]))))] for a in axes]
    g = np.stack(np.meshgrid(*coarse, indexing="ij"), -1).reshape(-1, 3)
    qm = geom.frame_to_mni(g.astype(np.float64)).T.reshape((3,) + tuple(len(c) for c in coarse))
    d = an.sample_template(tpl.sdist, qm.astype(np.float32), an.sdist_origin(), "nearest") * geom.scale
    inside = d < 48.0
    if not inside.any():
        return tuple(slice(0, n) for n in shape)
    out = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        hit = np.flatnonzero(inside.any(axis=other))
        lo_mm, hi_mm = coarse[ax][hit[0]] - 16.0, coarse[ax][hit[-1]] + 16.0
        step = axes[ax][1] - axes[ax][0]
        lo = int(np.clip(np.floor(lo_mm / step), 0, shape[ax]))
        hi = int(np.clip(np.ceil(hi_mm / step) + 1, 0, shape[ax]))
        out.append(slice(lo, hi))
    return tuple(out)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    out = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        hit = np.flatnonzero(mask.any(axis=other))
        if not len(hit):
            return tuple(slice(0, 0) for _ in range(3))
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(out)


def _intersect(a, b):
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return None if any(s.stop <= s.start for s in out) else out


def _relative(inner, outer):
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent random streams: anatomy, tumour, tissue/protocol, acquisition noise, grade, head."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6)]


def default_grade(seed: int) -> str:
    """The grade generate_case(seed) picks when none is given (70 % HGG, as in BraTS 2019)."""
    return "HGG" if _streams(seed)[4].random() < HGG_FRACTION else "LGG"


def _update_argmax(frac, code, best, out) -> None:
    upd = frac > best
    best[upd] = frac[upd]
    out[upd] = code


def _box(centre_mm, radius_mm, shape, spacing) -> tuple[slice, ...]:
    lo = np.floor((np.asarray(centre_mm) - radius_mm) / spacing).astype(int)
    hi = np.ceil((np.asarray(centre_mm) + radius_mm) / spacing).astype(int) + 1
    return tuple(slice(int(np.clip(a, 0, n)), int(np.clip(b, 0, n))) for a, b, n in zip(lo, hi, shape))


def _union_box(boxes) -> tuple[slice, ...]:
    return tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(3))


def _head_layers(rng, q, dist, axes, voxel):
    """Shells outside the brain surface (patient mm): CSF, meninges, skull tables and diploe, muscle, fat, skin.

    Computed only on the band of voxels between the brain surface and the skin (flat indices into the box).
    Returns (band indices, {tissue: fractions on the band}, outer skin distance on the band).
    """
    thick_full = random_field(rng, axes, 45.0, 1)[0]
    widths_draw = dict(
        csf=rng.uniform(1.2, 2.5), marrow=rng.uniform(1.5, 4.0), temporal=rng.uniform(6.0, 11.0),
        fat=rng.uniform(2.5, 6.5), skin=rng.uniform(1.6, 2.6),
    )
    d_flat = dist.reshape(-1)
    max_outer = 1.6 * (2.5 + 4.0 + 6.5) + 1.0 + 3.2 + 1.5 + 11.0 + 14.0 + 2.6 + voxel
    band = np.flatnonzero((d_flat > -voxel) & (d_flat < max_outer))
    d = d_flat[band]
    thick = np.exp(np.clip(0.18 * thick_full.reshape(-1)[band], -0.5, 0.5))
    del thick_full
    qx, qy, qz = (q[i].reshape(-1)[band] for i in range(3))
    temporal = 1.0 / (1.0 + np.exp(-(np.abs(qx) - 50.0) / 6.0)) * np.exp(-(((qz + 5.0) / 28.0) ** 2))
    neck = 1.0 / (1.0 + np.exp((qz + 35.0) / 8.0)) / (1.0 + np.exp((qy + 30.0) / 10.0))
    del qx, qy, qz
    widths = [
        ("csf_shell", widths_draw["csf"] * thick),  # subarachnoid CSF; brain CSF is separate
        ("meninges", 1.0),
        ("bone", 1.6),
        ("marrow", widths_draw["marrow"] * thick),
        ("bone", 1.6),
        ("muscle", 1.5 + widths_draw["temporal"] * temporal + 14.0 * neck),
        ("fat", widths_draw["fat"] * thick),
        ("skin", widths_draw["skin"]),
    ]
    layers: dict[str, np.ndarray] = {}
    inner = np.zeros_like(d)
    below = ramp(d, voxel)  # 1 outside the inner boundary
    for name, w in widths:
        outer = inner + np.float32(w) if np.isscalar(w) else inner + w.astype(np.float32)
        below_next = ramp(d - outer, voxel)
        frac = below - below_next
        layers[name] = layers[name] + frac if name in layers else frac
        inner, below = outer, below_next
    return band, layers, inner


def _bias_fields(rng, axes) -> dict[str, np.ndarray]:
    """Smooth positive receive fields, 10-40 % across the head: mostly the head coil's, partly per sequence.

    Built as a B-spline average of exp(node values) on an 80 mm lattice (cheap, and positive by design).
    t1n and t1c are the same sequence minutes apart, so they share almost all of theirs.
    """
    from .fields import bspline_matrix, lattice_axes, separable_field

    spacing = 80.0
    start, n = lattice_axes(np.array([a[0] for a in axes]), np.array([a[-1] for a in axes]), spacing)
    mats = [bspline_matrix(axes[d], start[d], spacing, n[d], partition=True) for d in range(3)]
    amp = rng.uniform(0.12, 0.25)
    shared, t1, t2w, t2f, t1c_extra = (rng.standard_normal(tuple(n)) for _ in range(5))
    nodes = {"t1n": 0.75 * shared + 0.66 * t1, "t2w": 0.75 * shared + 0.66 * t2w, "t2f": 0.75 * shared + 0.66 * t2f}
    nodes["t1c"] = nodes["t1n"] + 0.15 * t1c_extra
    return {c: separable_field(np.exp(amp * nodes[c]), *mats) for c in CONTRAST_KEYS}


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a set made with ``seed``: independent of how many cases or workers."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _make_one(task) -> tuple[int, str, dict]:
    from common.data.layouts import make_case_id, write_case

    out, layout, index, seed, shape, post = task
    case = generate_case(seed, shape=shape, post_treatment=post)
    case_id = make_case_id(layout, index, case.grade)
    path = write_case(
        out, layout, case_id, case.images, case.affine, label=case.label, label_scheme="brats2024", grade=case.grade
    )
    record = {
        "id": case_id,
        "index": index,
        "seed": seed,
        "grade": case.grade,
        "post_treatment": case.post_treatment,
        "labels_voxels": {str(k): int(v) for k, v in zip(*np.unique(case.label, return_counts=True)) if k},
        "lesions": case.lesions,
    }
    return index, str(path), record


MANIFEST = "phantoms.json"
"""Written beside the cases: how they were made (seeds, grades, lesions), for provenance and debugging."""


def make_phantoms(
    out,
    n: int,
    layout: str = "brats2023",
    seed: int = 0,
    shape=DEFAULT_SHAPE,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``n`` phantom cases in a BraTS ``layout`` under ``out``; returns their paths in case order.

    Case ``i`` uses ``case_seed(seed, i)``, so it is the same whatever ``n`` or ``workers``. Layout
    ``brats2024`` (the post-treatment release) gets resection cavities; grades are recorded as the layout allows.
    """
    from common.data.layouts import get_layout

    layout = get_layout(layout).name
    shape = _check_shape(shape)
    n = int(n)
    if n < 1:
        raise DataError("--n", f"number of phantom cases must be >= 1, got {n}")
    if workers is not None and int(workers) < 1:
        raise DataError("--workers", f"must be >= 1, got {workers}")
    out = check_output(out, "dir", flag="out")
    held = sorted(out.iterdir()) if out.is_dir() else []
    if held:  # mixing two requests would leave cases that the new manifest does not describe
        raise DataError(out, f"already holds {len(held)} entries (e.g. {held[0].name}); phantoms go into a new or "
                             "empty folder: remove it or choose another")
    out.mkdir(parents=True, exist_ok=True)
    post = layout in POST_TREATMENT_LAYOUTS
    tasks = [(out, layout, i, case_seed(seed, i), shape, post) for i in range(n)]
    workers = min(n, os.cpu_count() or 1) if workers is None else max(1, min(int(workers), n))
    an.templates()  # derive / load once here; forked workers inherit it
    results: list[tuple[int, str, dict]] = []
    bar = _progress(n, progress)
    try:
        if workers == 1:
            for t in tasks:
                results.append(_make_one(t))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(_make_one, t) for t in tasks]
                for f in as_completed(futures):
                    results.append(f.result())
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: r[0])
    from common import __version__
    from common.io import save_json

    save_json(
        {
            "generator": "common.phantom.make_phantoms",
            "version": __version__,
            "layout": layout,
            "seed": int(seed),
            "shape": list(shape),
            "spacing_mm": [float(v) for v in an.grid_spacing(shape)],
            "label_scheme_of_records": "brats2024",
            "cases": [r for _, _, r in results],
        },
        out / MANIFEST,
    )
    return [Path(p) for _, p, _ in results]


def _progress(n: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="phantoms", unit="case", disable=not enabled)
