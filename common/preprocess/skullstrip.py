"""Skull stripping: weight-free (atlas brain mask carried by the registration) or HD-BET when it is usable."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import numpy as np

from common.io import load_nifti, save_nifti

SKULL_STRIP_METHODS = ("auto", "atlas", "hdbet", "none")


class HDBetUnavailable(RuntimeError):
    """HD-BET was asked for explicitly but cannot run here."""


def hdbet_weights_path() -> Path | None:
    """Where HD-BET (v2, nnU-Net based) keeps its checkpoint, or None when the package is not installed."""
    if importlib.util.find_spec("HD_BET") is None:
        return None
    try:
        from HD_BET.paths import folder_with_parameter_files
    except Exception:  # broken install: treat as absent
        return None
    return Path(folder_with_parameter_files) / "fold_all" / "checkpoint_final.pth"


def hdbet_status() -> tuple[bool, str]:
    """(usable, reason): HD-BET needs the package and its downloaded weights (never fetched here)."""
    weights = hdbet_weights_path()
    if weights is None:
        return False, "the HD_BET package is not installed (pip install hd-bet)"
    if not weights.is_file():
        return False, f"HD-BET weights are missing ({weights}); download them once with HD-BET's own tool"
    return True, f"HD-BET weights at {weights}"


def resolve_method(method: str) -> str:
    """'auto' -> 'hdbet' when usable, else 'atlas'; an explicit 'hdbet' that cannot run is an error."""
    if method not in SKULL_STRIP_METHODS:
        raise ValueError(f"unknown skull stripping {method!r}; choose one of {SKULL_STRIP_METHODS}")
    if method == "auto":
        return "hdbet" if hdbet_status()[0] else "atlas"
    if method == "hdbet":
        usable, reason = hdbet_status()
        if not usable:
            raise HDBetUnavailable(f"skull stripping 'hdbet' was requested but cannot run: {reason}; "
                                   "use --skull_strip atlas (weight-free) instead")
    return method


def hdbet_brain_mask(array: np.ndarray, affine: np.ndarray, device: str | None = None) -> np.ndarray:
    """Brain mask of one (skull-on, ~1 mm) volume by HD-BET v2; runs through temporary NIfTI files."""
    import torch
    from HD_BET.hd_bet_prediction import get_hdbet_predictor, hdbet_predict

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = get_hdbet_predictor(use_tta=False, device=torch.device(device), verbose=False)
    with tempfile.TemporaryDirectory(prefix="hdbet_") as tmp:
        src = Path(tmp) / "in" / "image.nii.gz"
        out_dir = Path(tmp) / "out"  # HD-BET writes (and deletes) bookkeeping files beside its outputs
        out_dir.mkdir()
        save_nifti(array.astype(np.float32), affine, src)
        out = out_dir / "image.nii.gz"
        hdbet_predict(str(src), str(out), predictor, keep_brain_mask=True, compute_brain_extracted_image=False)
        mask, _, _ = load_nifti(os.fspath(out_dir / "image_bet.nii.gz"))
    return mask > 0
