"""Generated volumes written on the conditioning mask's grid (its affine and header), BraTS file names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from common import CONTRASTS
from common.io import DataError, save_nifti, torch_load


def save_generated(
    images: np.ndarray,
    affine: np.ndarray,
    header,
    out_dir: str | os.PathLike,
    case_id: str,
    mask: np.ndarray | None = None,
    contrasts: Sequence[str] = CONTRASTS,
    montage: bool = True,
    save_mask: bool = True,
) -> dict[str, Path]:
    """``images`` [C, H, W, D] -> ``out_dir/<case_id>/<case_id>-<contrast>.nii.gz`` (+ ``-seg`` copy of the mask and
    ``<case_id>.png`` montage with the mask outlined). Each file is written atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[0] != len(contrasts):
        raise ValueError(f"{images.shape[0]} generated channels for {len(contrasts)} contrasts {tuple(contrasts)}")
    folder = Path(out_dir) / case_id
    paths: dict[str, Path] = {}
    for contrast, volume in zip(contrasts, images):
        paths[contrast] = save_nifti(volume, affine, folder / f"{case_id}-{contrast}.nii.gz", header=header, dtype=np.float32)
    if mask is not None and save_mask:
        paths["seg"] = save_nifti(mask, affine, folder / f"{case_id}-seg.nii.gz", header=header, dtype=np.uint8)
    if montage:
        from common.viz import save_montage

        paths["montage"] = save_montage(
            dict(zip(contrasts, images)), folder / f"{case_id}.png", mask=mask, title=f"{case_id} (generated)", affine=affine
        )
    return paths


def load_weights(network, path: str | os.PathLike, key: str | None = None, strict: bool = True):
    """Fill ``network`` from a checkpoint (weights_only) and return it; a full training checkpoint works too
    (``key`` picks the network's entry, default: the whole file or its "network"/"model" entry)."""
    state = torch_load(path)
    if key is not None:
        if key not in state:
            raise DataError(path, f"no entry {key!r} in checkpoint (has {sorted(state)[:8]})")
        state = state[key]
    elif isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
        for k in ("network", "model", "state_dict"):
            if k in state:
                state = state[k]
                break
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise DataError(path, f"weights do not fit the configured network ({str(exc)[:300]})") from exc
    return network
