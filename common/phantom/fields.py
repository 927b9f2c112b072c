"""Smooth random fields on millimetre lattices, evaluated separably (fast, and the same at any voxel size)."""

from __future__ import annotations

import numpy as np


def bspline_matrix(
    positions_mm: np.ndarray, start_mm: float, spacing_mm: float, n_nodes: int, partition: bool = False
) -> np.ndarray:
    """Cubic B-spline weights of ``n_nodes`` lattice nodes at ``positions_mm``.

    Rows are scaled to unit norm, so a field built from i.i.d. unit-variance nodes has unit variance
    everywhere (amplitudes are then in the field's units); ``partition=True`` keeps the plain weights,
    which sum to one (a smooth weighted average of the node values).
    """
    t = (np.asarray(positions_mm, dtype=np.float64)[:, None] - (start_mm + spacing_mm * np.arange(n_nodes))[None]) / spacing_mm
    a = np.abs(t)
    w = np.where(a < 1, 2.0 / 3.0 - a**2 + a**3 / 2.0, np.where(a < 2, (2.0 - a) ** 3 / 6.0, 0.0))
    if partition:
        return (w / np.maximum(w.sum(1, keepdims=True), 1e-12)).astype(np.float32)
    norm = np.sqrt((w**2).sum(1, keepdims=True))
    return (w / np.maximum(norm, 1e-12)).astype(np.float32)


def separable_field(nodes: np.ndarray, mx: np.ndarray, my: np.ndarray, mz: np.ndarray) -> np.ndarray:
    """out[i,j,k] = sum mx[i,a] my[j,b] mz[k,c] nodes[a,b,c], as three matrix products (no transposes)."""
    na = nodes.shape[0]
    ni, nj, nk = mx.shape[0], my.shape[0], mz.shape[0]
    t = nodes.astype(np.float32) @ mz.T  # (na, nb, nk)
    t = np.matmul(my, t)  # (na, nj, nk)
    return (mx @ t.reshape(na, nj * nk)).reshape(ni, nj, nk)


def lattice_axes(lo_mm: np.ndarray, hi_mm: np.ndarray, spacing_mm: float):
    """Node start and count per axis so cubic B-splines cover [lo, hi] fully (one extra node beyond each end)."""
    lo = np.asarray(lo_mm, float)
    hi = np.asarray(hi_mm, float)
    n = np.ceil((hi - lo) / spacing_mm).astype(int) + 4
    start = lo - 1.5 * spacing_mm
    return start, n


def random_field(rng: np.random.Generator, axes_mm: tuple, spacing_mm: float, n_fields: int = 1) -> list[np.ndarray]:
    """``n_fields`` independent smooth unit-variance fields on the grid spanned by the 1-D ``axes_mm``."""
    lo = np.array([a[0] for a in axes_mm])
    hi = np.array([a[-1] for a in axes_mm])
    start, n = lattice_axes(lo, hi, spacing_mm)
    mats = [bspline_matrix(axes_mm[d], start[d], spacing_mm, n[d]) for d in range(3)]
    out = []
    for _ in range(n_fields):
        nodes = rng.standard_normal(tuple(n)).astype(np.float32)
        out.append(separable_field(nodes, *mats))
    return out


def ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 below -width/2, 1 above +width/2, linear in between: the partial-volume share of a boundary."""
    y = np.multiply(x, np.float32(1.0 / max(width, 1e-6)), dtype=np.float32)
    y += np.float32(0.5)
    return np.clip(y, 0.0, 1.0, out=y)
