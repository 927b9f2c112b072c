"""Memorisation check: nearest-neighbour distance of every synthetic sample to the training set.

Volumes are normalised to the brain's 0.5-99.5 percentiles, downsampled to a small common grid and
compared by correlation distance (1 - Pearson r: 0 for a copy, ~1 for unrelated images). A sample is
flagged as a near-copy when it lies closer to its nearest training case than ``ratio`` times the median
distance between a training case and its own nearest *other* training case: nearer to one training
image than training images typically are to each other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from common.metrics.similarity import percentile_normalise


def embed(volume, grid: Sequence[int] = (32, 32, 32)) -> torch.Tensor:
    """Normalised, downsampled, centred and unit-length vector of one volume."""
    vol = torch.as_tensor(percentile_normalise(volume))[None, None]
    vol = F.interpolate(vol, size=tuple(grid), mode="trilinear", align_corners=False).flatten().double()
    vol = vol - vol.mean()
    return vol / vol.norm().clamp_min(1e-12)


def correlation_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - Pearson r between every row of ``a`` and every row of ``b`` (rows already centred, unit length)."""
    return (1 - a @ b.T).clamp_min(0)


def nearest_neighbours(
    synthetic: Sequence, training: Sequence, synthetic_ids: Sequence[str] | None = None,
    training_ids: Sequence[str] | None = None, ratio: float = 0.5, grid: Sequence[int] = (32, 32, 32),
) -> dict:
    """Nearest training case and distance for every synthetic volume, and the near-copy flags.

    Volumes may be arrays or zero-argument loaders (so large sets are read one at a time).
    """
    if len(training) < 2 or not synthetic:
        raise ValueError(f"need >= 2 training and >= 1 synthetic volumes, got {len(training)} and {len(synthetic)}")
    synthetic_ids = list(synthetic_ids or [str(i) for i in range(len(synthetic))])
    training_ids = list(training_ids or [str(i) for i in range(len(training))])
    s = torch.stack([embed(v() if callable(v) else v, grid) for v in synthetic])
    t = torch.stack([embed(v() if callable(v) else v, grid) for v in training])
    d_st = correlation_distances(s, t)
    d_tt = correlation_distances(t, t)
    d_tt.fill_diagonal_(float("inf"))
    typical = float(d_tt.min(1).values.median())
    threshold = ratio * typical
    nn_dist, nn_idx = d_st.min(1)
    samples = [
        {"id": sid, "nearest_training_id": training_ids[int(j)], "distance": float(d), "near_copy": bool(d < threshold)}
        for sid, d, j in zip(synthetic_ids, nn_dist, nn_idx)
    ]
    return {
        "samples": samples,
        "threshold": threshold,
        "training_nn_median": typical,
        "ratio": ratio,
        "n_flagged": int(sum(x["near_copy"] for x in samples)),
        "n_synthetic": len(samples),
        "n_training": len(training_ids),
        "min_distance": float(nn_dist.min()),
        "median_distance": float(nn_dist.median()),
    }
