"""The registration target: MNI152 2009c from nilearn's wheel (offline) by default, or any atlas file."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.io import DataError, load_nifti
from common.preprocess.core import resample_to, to_sitk

DEFAULT_ATLAS = "mni152"


@dataclass
class Atlas:
    """A T1 template and its brain mask on the same grid (SimpleITK images, LPS)."""

    name: str
    image: sitk.Image
    brain_mask: sitk.Image  # uint8 0/1


def _nilearn_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    return (
        np.asarray(template.get_fdata(), dtype=np.float32),
        np.asarray(mask.get_fdata()) > 0,
        np.asarray(template.affine, dtype=np.float64),
    )


@functools.lru_cache(maxsize=4)
def load_atlas(path: str | None = None, mask_path: str | None = None) -> Atlas:
    """Load (and cache per process) an atlas.

    ``path=None`` or ``"mni152"``: nilearn's skull-stripped MNI152 2009c T1 and brain mask at 1 mm. Any other
    path: a NIfTI T1 template; its brain mask comes from ``mask_path`` or, for a skull-stripped template
    (mostly zero background), from its non-zero voxels. A template with a head around the brain needs
    ``mask_path``: skull stripping takes the brain from it.
    """
    if path is None or str(path).lower() == DEFAULT_ATLAS:
        array, mask, affine = _nilearn_mni152()
        name = "MNI152NLin2009cSym (nilearn, 1 mm)"
        if mask_path is not None:
            mask = _load_mask(mask_path, array.shape, affine)
    else:
        array, affine, _ = load_nifti(path)
        name = str(Path(path))
        if array.ndim != 3:
            raise DataError(path, f"atlas must be a 3D volume, got shape {array.shape}")
        if mask_path is not None:
            mask = _load_mask(mask_path, array.shape, affine)
        else:
            mask = array > 0
            if mask.mean() > 0.6:
                raise DataError(
                    path,
                    "atlas is not skull-stripped (little zero background): pass its brain mask (--atlas_mask)",
                )
            mask = _largest_filled(mask)
    if mask.sum() < 1000:
        raise DataError(mask_path or path or DEFAULT_ATLAS, "atlas brain mask has (almost) no voxels")
    return Atlas(name=name, image=to_sitk(array, affine), brain_mask=to_sitk(mask.astype(np.uint8), affine, sitk.sitkUInt8))


def _load_mask(mask_path, shape, affine) -> np.ndarray:
    mask, mask_affine, _ = load_nifti(mask_path)
    if mask.shape != tuple(shape) or not np.allclose(mask_affine, affine, atol=1e-3):
        # bring it onto the template grid
        reference = to_sitk(np.zeros(shape, np.float32), affine)
        moved = resample_to(to_sitk(mask, mask_affine), reference, nearest=True)
        mask = sitk.GetArrayFromImage(moved).transpose(2, 1, 0)
    return np.asarray(mask) > 0.5


def _largest_filled(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)
