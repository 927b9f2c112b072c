"""Glioma lesions: BraTS compartments with irregular shapes, and the mass effect that pushes tissue aside.

A lesion is a set of nested, noise-perturbed ellipsoidal level sets around a centre (frame mm):
necrosis (or a resection cavity) inside a solid rim that is partly enhancing, inside a zone of oedema that
spreads preferentially along white matter. Its growth displaces the surrounding brain radially with
volume conservation (a sphere of radius ``push`` is inserted), tapered so the skull stays put.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .fields import random_field, ramp

GRADES = ("HGG", "LGG")
KINDS = ("hgg", "lgg", "cavity")


@dataclass
class Lesion:
    centre: np.ndarray  # frame mm (array-aligned, 0..FOV)
    kind: str  # "hgg" (necrotic core, enhancing rim), "lgg" (solid, little enhancement), "cavity" (post-treatment)
    r_core: float  # mm, tumour core (enhancing + necrotic / solid)
    r_edema: float  # mm, outer extent of oedema
    inner: float  # necrosis / cavity radius relative to r_core (0 = none)
    push: float  # mm, radius of the volume inserted by growth (mass effect)
    axes: np.ndarray  # 3x3, anisotropy and orientation (det 1)
    enhancing_bias: float  # larger -> more of the solid rim enhances
    seed: int = 0
    info: dict = field(default_factory=dict)

    @property
    def extent_mm(self) -> float:
        return 1.5 * max(self.r_edema, self.r_core) + 4.0


def _random_axes(rng: np.random.Generator, spread: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    scales = np.exp(rng.uniform(-spread, spread, size=3))
    scales /= np.prod(scales) ** (1 / 3)
    return (q @ np.diag(1.0 / scales) @ q.T).astype(np.float64)


def sample_lesions(rng: np.random.Generator, grade: str, post_treatment: bool, sites_frame: np.ndarray) -> list[Lesion]:
    """1-3 lesions: a main one and (sometimes) smaller satellites nearby or elsewhere (multicentric)."""
    n = int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10] if grade == "HGG" else [0.8, 0.15, 0.05]))
    main_site = sites_frame[rng.integers(len(sites_frame))]
    lesions = []
    for k in range(n):
        if k == 0:
            centre = main_site
        else:
            d = np.linalg.norm(sites_frame - main_site, axis=1)
            near = np.flatnonzero((d > lesions[0].r_core + 8) & (d < lesions[0].r_core + 40))
            pool = near if (len(near) and rng.random() < 0.7) else np.arange(len(sites_frame))
            centre = sites_frame[rng.choice(pool)]
        satellite = k > 0
        if post_treatment and not satellite and rng.random() < 0.85:
            kind = "cavity"
        else:
            kind = "hgg" if grade == "HGG" else "lgg"
        lesions.append(_lesion(rng, kind, np.asarray(centre, float), satellite))
    return lesions


def _lesion(rng: np.random.Generator, kind: str, centre: np.ndarray, satellite: bool) -> Lesion:
    size = 0.45 if satellite else 1.0
    if kind == "hgg":
        r_core = rng.uniform(11, 24) * size
        r_edema = r_core * rng.uniform(1.25, 1.8)
        inner = rng.uniform(0.35, 0.75) if rng.random() < 0.9 else rng.uniform(0.0, 0.3)
        push = r_core * rng.uniform(0.45, 0.7)
        enh = rng.uniform(0.6, 1.4)
    elif kind == "lgg":
        r_core = rng.uniform(12, 27) * size
        r_edema = r_core * rng.uniform(1.1, 1.5)
        inner = 0.0
        push = r_core * rng.uniform(0.25, 0.45)
        enh = -1.9 if rng.random() < 0.35 else -99.0  # a third of LGGs have a small faint enhancing patch
    else:  # resection cavity with residual / recurrent tumour and post-treatment FLAIR changes around it
        r_core = rng.uniform(13, 25)
        r_edema = r_core * rng.uniform(1.3, 1.9)
        inner = rng.uniform(0.6, 0.85)
        push = r_core * rng.uniform(0.0, 0.25)
        enh = rng.uniform(-0.6, 0.3)
    return Lesion(
        centre=centre,
        kind=kind,
        r_core=float(r_core),
        r_edema=float(r_edema),
        inner=float(inner),
        push=float(push),
        axes=_random_axes(rng, 0.25),
        enhancing_bias=float(enh),
        seed=int(rng.integers(2**31)),
    )


def push_back(points: list[np.ndarray], lesion: Lesion, stiffness: np.ndarray) -> None:
    """In place: move frame positions to where their tissue was before the lesion grew.

    Growth opens a ball of radius P (filled by tumour) and shoves the brain outward by P, decaying as
    exp(-(r - P) / lambda) with lambda ~ the core radius, so the ventricles and midline move with a large
    tumour. ``stiffness`` in [0, 1] (0 at the brain surface and beyond, 1 deep inside) keeps the skull
    still: the cortex next to a lesion is compressed (sulci effaced) instead of pushed through the bone.
    """
    if lesion.push <= 0.05:
        return
    p = np.float32(lesion.push)
    lam = np.float32(push_decay(lesion))
    vx, vy, vz = (points[d] - np.float32(lesion.centre[d]) for d in range(3))
    r = np.sqrt(vx * vx + vy * vy + vz * vz)
    shift = np.where(r <= p, r, p * np.exp(-(r - p) / lam))
    shift *= stiffness
    factor = 1.0 - shift / np.maximum(r, np.float32(1e-3))
    points[0][...] = lesion.centre[0] + vx * factor
    points[1][...] = lesion.centre[1] + vy * factor
    points[2][...] = lesion.centre[2] + vz * factor


def push_decay(lesion: Lesion) -> float:
    return 1.2 * lesion.r_core


def push_extent(lesion: Lesion) -> float:
    """Radius beyond which the push is under ~1 % of P."""
    return lesion.push + 4.6 * push_decay(lesion)


COMPARTMENTS = ("necrosis", "netc", "et", "edema", "cavity")


def lesion_fractions(
    lesion: Lesion, axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray], wm_ratio: np.ndarray, voxel_mm: float
) -> dict[str, np.ndarray]:
    """Partial-volume fractions of each compartment on the box grid ``axes_mm`` (1-D frame mm per axis).

    ``wm_ratio`` = WM / (WM + GM) on that box: oedema extends further in white matter (it spreads along
    tracts and spares the cortex).
    """
    rng = np.random.default_rng(lesion.seed)
    gx, gy, gz = np.meshgrid(*[a.astype(np.float32) - np.float32(c) for a, c in zip(axes_mm, lesion.centre)], indexing="ij", sparse=True)
    a = lesion.axes.astype(np.float32)
    ux = a[0, 0] * gx + a[0, 1] * gy + a[0, 2] * gz
    uy = a[1, 0] * gx + a[1, 1] * gy + a[1, 2] * gz
    uz = a[2, 0] * gx + a[2, 1] * gy + a[2, 2] * gz
    dist = np.sqrt(ux * ux + uy * uy + uz * uz)
    del ux, uy, uz
    shape_f, inner_f, patch_f = random_field(rng, axes_mm, max(4.0, lesion.r_core / 2.5), 3)
    fine = random_field(rng, axes_mm, 3.0, 1)[0]
    edema_f = random_field(rng, axes_mm, max(8.0, lesion.r_edema / 2.0), 1)[0]
    w = voxel_mm
    r_core_eff = lesion.r_core * np.exp(0.22 * shape_f + 0.05 * fine)
    core = ramp(r_core_eff - dist, w)
    out = {k: np.zeros(dist.shape, np.float32) for k in COMPARTMENTS}
    if lesion.inner > 0:
        r_inner = lesion.inner * lesion.r_core * np.exp(0.3 * inner_f + 0.06 * fine)
        r_inner = np.minimum(r_inner, r_core_eff - 1.5)  # keep a rim around necrosis / cavity
        inner = ramp(r_inner - dist, w)
    else:
        inner = np.zeros_like(core)
    solid = np.clip(core - inner, 0.0, 1.0)
    enhancing = ramp(patch_f + 0.35 * fine + lesion.enhancing_bias, 0.7)
    if lesion.kind == "hgg":
        out["necrosis"] = inner.astype(np.float32)
    elif lesion.kind == "cavity":
        out["cavity"] = inner.astype(np.float32)
    if lesion.kind == "lgg":
        # the faint patch must stay well inside the solid tumour
        enhancing = enhancing * ramp(0.6 * lesion.r_core - dist, w)
    out["et"] = (solid * enhancing).astype(np.float32)
    out["netc"] = (solid * (1.0 - enhancing)).astype(np.float32)
    thr = lesion.r_edema * (0.75 + 0.5 * wm_ratio) * np.exp(0.35 * edema_f + 0.08 * fine)
    edema = ramp(thr - dist, 1.5 * w)
    out["edema"] = (_connected_to(edema, core) * (1.0 - core)).astype(np.float32)
    return out


def _connected_to(region: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """``region`` without the islands that do not touch ``seed`` (oedema spreads from the tumour)."""
    from scipy import ndimage as ndi

    parts, n = ndi.label((region >= 0.25) | (seed >= 0.5))
    if n <= 1:
        return region
    keep = np.zeros(n + 1, bool)
    keep[np.unique(parts[seed >= 0.5])] = True
    keep[0] = False
    return region * keep[parts]
