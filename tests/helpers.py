"""Small helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

# every header field that places a volume in space: an output "on the source grid" keeps all of them
GRID_HEADER_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                      "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def bundle_command(bundle: Path, env: dict, args: list[str], timeout: float = 900, runner: list[str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` (or ``runner + args``) from the bundle folder; asserts success by default."""
    cmd = (runner or [sys.executable, "-m", "monai.bundle"]) + list(args)
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def assert_imputed_on_source_grid(output: str, source: str) -> np.ndarray:
    """An imputed image has its source's shape, affine and spatial header, values in [0, 1] and zero background;
    returns its voxels."""
    import nibabel as nib

    out, src = nib.load(output), nib.load(source)
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    for field in GRID_HEADER_FIELDS:
        np.testing.assert_array_equal(out.header[field], src.header[field], err_msg=field)
    data = np.asarray(out.dataobj)
    assert data.min() >= 0 and data.max() <= 1 and data.any()
    assert not data[np.asarray(src.dataobj) == 0].any()  # background stays background
    return data
