"""Pictures people look at instead of numbers: slice montages with the tumor mask outlined."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.io import atomic_path

PLANES = ("axial", "coronal", "sagittal")


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def middle_slices(volume: np.ndarray, center: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices (RAS voxel order: x, y, z) through ``center``, display-oriented."""
    vol = np.asarray(volume)
    c = [s // 2 for s in vol.shape[:3]] if center is None else [int(v) for v in center]
    return {
        "axial": np.rot90(vol[:, :, c[2]]),
        "coronal": np.rot90(vol[:, c[1], :]),
        "sagittal": np.rot90(vol[c[0], :, :]),
    }


def mask_center(mask: np.ndarray | None, shape: Sequence[int]) -> list[int]:
    """Centre of mass of the mask (so the slices cut through the tumor), else the volume centre."""
    if mask is not None and np.any(mask > 0):
        idx = np.argwhere(np.asarray(mask) > 0)
        return [int(round(v)) for v in idx.mean(axis=0)[:3]]
    return [s // 2 for s in shape[:3]]


def _display_range(vol: np.ndarray) -> tuple[float, float]:
    nz = vol[vol != 0]
    if nz.size == 0:
        return float(vol.min()), float(vol.max()) or 1.0
    lo, hi = np.percentile(nz, [0.5, 99.5])
    return float(min(lo, 0.0)), float(hi if hi > lo else lo + 1.0)


def save_montage(
    images: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    mask: np.ndarray | None = None,
    title: str | None = None,
    planes: Sequence[str] = PLANES,
    center: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
) -> Path:
    """One row per plane, one column per image; the mask (labels > 0) is outlined in red on every panel.

    ``affine`` gives the voxel sizes, so anisotropic grids (e.g. 64x64x32 over a whole head) are not squashed.
    """
    plt = _matplotlib()
    names = list(images)
    if not names:
        raise ValueError("save_montage needs at least one image")
    shape = np.asarray(images[names[0]]).shape
    if center is None:
        center = mask_center(mask, shape)
    fig, axes = plt.subplots(len(planes), len(names), figsize=(2.6 * len(names), 2.6 * len(planes)), squeeze=False)
    dx, dy, dz = (1.0, 1.0, 1.0) if affine is None else np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    aspects = {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}  # row height / column width per pixel
    mask_slices = middle_slices((np.asarray(mask) > 0).astype(np.float32), center) if mask is not None else None
    for j, name in enumerate(names):
        vol = np.asarray(images[name], dtype=np.float32)
        vmin, vmax = _display_range(vol)
        slices = middle_slices(vol, center)
        for i, plane in enumerate(planes):
            ax = axes[i][j]
            ax.imshow(slices[plane], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest",
                      aspect=aspects[plane])
            if mask_slices is not None and mask_slices[plane].any():
                ax.contour(mask_slices[plane], levels=[0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=10)
            if j == 0:
                ax.set_ylabel(plane, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)


def stack_pictures(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """PNG pictures one above the other, centred, on white (one figure out of a method's several)."""
    from PIL import Image

    pictures = [Image.open(p).convert("RGB") for p in paths]
    width = max(p.width for p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height for p in pictures)), "white")
    y = 0
    for picture in pictures:
        canvas.paste(picture, ((width - picture.width) // 2, y))
        y += picture.height
    out = Path(out)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
    return out
