"""Normal anatomy: the MNI152 2009 templates shipped with nilearn, made into tissue maps and a head.

The templates are loaded and derived once per process (and cached on disk in the user cache dir, never in
the repository). Per case, a random affine (scale, rotation, shift), left/right asymmetry and a smooth
random deformation map every output voxel back to template space; head tissues are shells built from the
signed distance to the brain surface, so skull, marrow, muscle, fat and skin follow the case's brain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.io import cache_dir

from .fields import bspline_matrix, lattice_axes, separable_field

FOV_MM = (240.0, 240.0, 155.0)
"""Field of view of the BraTS (SRI24) grid: 240x240x155 voxels of 1 mm."""

TEMPLATE_ORIGIN_MM = np.array([-98.0, -134.0, -72.0])
"""World position of voxel (0,0,0) of the 1 mm MNI152 2009 templates (identity rotation, 1 mm)."""

SDIST_PAD = ((30, 30), (30, 30), (30, 20))
"""Voxels added around the template before the distance transform (room for skull and scalp)."""

SDIST_CLIP_MM = 60.0
CACHE_VERSION = 1

# Brain-centre (MNI mm) and where it lands in the output frame (array-aligned mm, 0..FOV), chosen so
# that a 0.93-scaled MNI brain sits like an SRI24 brain: centred left/right and front/back, top of the
# brain about 10 mm under the top slice, cerebellum just above the bottom slice.
MNI_CENTRE = np.array([0.0, -17.0, 5.0])
FRAME_CENTRE = np.array([120.0, 122.0, 74.0])


@dataclass(frozen=True)
class Templates:
    """Template-space maps (1 mm MNI grid): grey/white-matter fractions and signed distance to the brain."""

    gm: np.ndarray  # float32 (197, 233, 189)
    wm: np.ndarray  # float32
    sdist: np.ndarray  # float32, padded by SDIST_PAD, mm, > 0 outside the brain
    tumor_sites: np.ndarray  # (K, 3) MNI mm of deep cerebral white matter where a glioma may start


def _derive_templates() -> dict[str, np.ndarray]:
    from nilearn import datasets
    from scipy import ndimage as ndi

    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    brain = ndi.binary_fill_holes(ndi.binary_closing(brain, iterations=2))
    gm = np.where(brain, gm, 0.0).astype(np.float32)
    wm = np.where(brain, wm, 0.0).astype(np.float32)
    # Brainstem continues below the template: extend the lowest slices' mask down (a neck for the shells).
    padded = np.pad(brain, SDIST_PAD, mode="constant")
    z0 = SDIST_PAD[2][0]
    padded[:, :, :z0] = padded[:, :, z0 : z0 + 1] & _erode_2d(padded[:, :, z0], 3)[:, :, None]
    outside = ndi.distance_transform_edt(~padded)
    inside = ndi.distance_transform_edt(padded)
    sdist = np.clip(outside - inside + 0.5 * padded - 0.5 * ~padded, -SDIST_CLIP_MM, SDIST_CLIP_MM)
    # Candidate tumour sites: deep white matter of the cerebral hemispheres.
    depth = inside[SDIST_PAD[0][0] : -SDIST_PAD[0][1], SDIST_PAD[1][0] : -SDIST_PAD[1][1], z0 : -SDIST_PAD[2][1]]
    ijk = np.argwhere((wm > 0.7) & (depth > 14))
    mm = ijk + TEMPLATE_ORIGIN_MM
    keep = (np.abs(mm[:, 0]) > 10) & (mm[:, 2] > -30) & ((mm[:, 2] > -5) | (mm[:, 1] > -40))
    sites = mm[keep][::7].astype(np.float32)
    return {
        "gm": np.round(gm * 255).astype(np.uint8),
        "wm": np.round(wm * 255).astype(np.uint8),
        "sdist": np.round(sdist * 2).astype(np.int8),  # 0.5 mm steps
        "tumor_sites": sites,
    }


def _erode_2d(mask2d: np.ndarray, iterations: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.binary_erosion(mask2d, iterations=iterations)


@functools.lru_cache(maxsize=1)
def templates() -> Templates:
    """Load the derived template maps, from the user cache when present (about 0.3 s), else derive (~10 s)."""
    from common.io import atomic_path

    path = cache_dir() / f"phantom_anatomy_v{CACHE_VERSION}.npz"
    raw = None
    if path.is_file():
        try:
            with np.load(path) as f:
                raw = {k: f[k] for k in ("gm", "wm", "sdist", "tumor_sites")}
        except Exception:  # corrupt cache: derive again
            raw = None
    if raw is None:
        raw = _derive_templates()
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **raw)
        except OSError:
            pass  # read-only home: keep the in-process copy only
    return Templates(
        gm=raw["gm"].astype(np.float32) / 255.0,
        wm=raw["wm"].astype(np.float32) / 255.0,
        sdist=raw["sdist"].astype(np.float32) / 2.0,
        tumor_sites=raw["tumor_sites"],
    )


@functools.lru_cache(maxsize=4)
def brain_maps_for_spacing(spacing_key: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """GM/WM fractions low-pass filtered for coarse output voxels (a voxel averages, it does not point-sample)."""
    from scipy import ndimage as ndi

    t = templates()
    sigma = [np.sqrt(max(s * s - 1.0, 0.0)) / 2.355 for s in spacing_key]
    if max(sigma) < 0.3:
        return t.gm, t.wm
    return (ndi.gaussian_filter(t.gm, sigma).astype(np.float32), ndi.gaussian_filter(t.wm, sigma).astype(np.float32))


def grid_axes_mm(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre positions (mm) along each array axis in the output frame spanning FOV_MM."""
    return tuple(((np.arange(n) + 0.5) * (FOV_MM[d] / n)).astype(np.float32) for d, n in enumerate(shape))


def grid_spacing(shape: tuple[int, int, int]) -> np.ndarray:
    return np.array([FOV_MM[d] / n for d, n in enumerate(shape)])


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The BraTS/SRI24 affine (x and y flipped: LPS on disk) for ``shape`` voxels over the same field of view.

    At 240x240x155 it is exactly BraTS's ``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0]]``; coarser grids keep the
    physical extent, so voxel centres sit in the middle of the corresponding 1 mm blocks.
    """
    sx, sy, sz = grid_spacing(shape)
    aff = np.eye(4)
    aff[0, 0], aff[0, 3] = -sx, 0.5 - 0.5 * sx
    aff[1, 1], aff[1, 3] = -sy, 239.5 - 0.5 * sy
    aff[2, 2], aff[2, 3] = sz, 0.5 * sz - 0.5
    return aff


# Output-frame axes point to patient left, posterior, superior; MNI axes to right, anterior, superior.
_FRAME_TO_MNI_AXES = np.diag([-1.0, -1.0, 1.0])


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class CaseGeometry:
    """How this case's head differs from the template: frame mm -> MNI mm (inverse of the case's build)."""

    linear: np.ndarray  # 3x3, frame mm -> MNI mm
    offset: np.ndarray  # 3
    asymmetry: float  # relative left/right hemisphere size difference
    deform_nodes: np.ndarray  # (3, a, b, c) displacement lattice, MNI mm
    deform_spacing: float
    scale: float  # mean linear scale patient/template (for converting template mm)

    @classmethod
    def random(cls, rng: np.random.Generator) -> "CaseGeometry":
        scale = rng.uniform(0.89, 0.97)
        per_axis = scale * (1.0 + rng.uniform(-0.03, 0.03, size=3))
        angles = np.deg2rad(np.clip(rng.normal(0.0, 2.0, size=3), -5, 5))
        shift = np.clip(rng.normal(0.0, 2.5, size=3), -6, 6)
        # frame -> MNI: undo shift, rotation, per-axis scale; axes flip
        rot = _rotation(angles)
        linear = np.diag(1.0 / per_axis) @ rot.T @ _FRAME_TO_MNI_AXES
        offset = MNI_CENTRE - linear @ (FRAME_CENTRE + shift)
        spacing = 40.0
        _, n = lattice_axes(np.zeros(3), np.array(FOV_MM), spacing)
        amplitude = rng.uniform(1.5, 3.5)
        nodes = (rng.standard_normal((3, *n)) * amplitude).astype(np.float32)
        return cls(linear, offset, float(rng.uniform(-0.04, 0.04)), nodes, spacing, float(scale))

    def deformation(self, axes_mm) -> list[np.ndarray]:
        start, n = lattice_axes(np.zeros(3), np.array(FOV_MM), self.deform_spacing)
        mats = [bspline_matrix(axes_mm[d], start[d], self.deform_spacing, n[d]) for d in range(3)]
        return [separable_field(self.deform_nodes[c], *mats) for c in range(3)]

    def frame_to_mni(self, points: np.ndarray) -> np.ndarray:
        """(N,3) frame mm -> (N,3) MNI mm, without the smooth deformation (for sparse queries)."""
        q = points @ self.linear.T + self.offset
        q[:, 0] = q[:, 0] * (1.0 + self.asymmetry * np.tanh(q[:, 0] / 15.0))
        return q


def sample_template(volume: np.ndarray, mni_mm: np.ndarray, origin_mm: np.ndarray, mode: str, cval: float = 0.0):
    """Trilinear samples of a template-grid ``volume`` at MNI positions given as a (3, ...) array."""
    from scipy import ndimage as ndi

    idx = mni_mm - origin_mm.reshape((3,) + (1,) * (mni_mm.ndim - 1)).astype(np.float32)
    return ndi.map_coordinates(volume, idx, order=1, mode=mode, cval=cval, prefilter=False)


def sdist_origin() -> np.ndarray:
    return TEMPLATE_ORIGIN_MM - np.array([p[0] for p in SDIST_PAD], dtype=float)
