"""N4 shrinks each axis towards the target spacing (anisotropic scans no longer run at full in-plane size)."""

import numpy as np
import pytest
import SimpleITK as sitk

from common.preprocess import core


def _image(size, spacing, bias=True):
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in size[::-1]], indexing="ij")
    head = (x**2 + y**2 + z**2) < 0.8
    tissue = np.where((x**2 + y**2 + z**2) < 0.3, 1.0, 0.6) * head
    field = np.exp(0.3 * x + 0.2 * y) if bias else 1.0
    img = sitk.GetImageFromArray((100 * tissue * field).astype(np.float32))
    img.SetSpacing(spacing)
    return img, tissue


def test_shrink_factors_follow_each_axis_spacing():
    aniso, _ = _image((96, 96, 20), (1.0, 1.0, 7.0), bias=False)
    assert core.n4_shrink_factor(aniso, 4.0) == (4, 4, 1)
    iso, _ = _image((96, 96, 96), (1.0, 1.0, 1.0), bias=False)
    assert core.n4_shrink_factor(iso, 4.0) == (4, 4, 4)
    two, _ = _image((64, 64, 40), (2.0, 2.0, 2.0), bias=False)
    assert core.n4_shrink_factor(two, 4.0) == (2, 2, 2)
    small, _ = _image((40, 40, 40), (0.5, 0.5, 0.5), bias=False)
    assert core.n4_shrink_factor(small, 4.0) == (2, 2, 2)  # at least 16 voxels left along each axis


def test_n4_with_per_axis_shrink_removes_the_bias_of_an_anisotropic_scan():
    image, tissue = _image((80, 80, 18), (1.0, 1.0, 7.0))
    factors = core.n4_shrink_factor(image, 4.0)
    corrected, log_bias = core.n4_bias_correct(image, shrink=factors, iterations=(20, 20))
    out = sitk.GetArrayFromImage(corrected)
    inner = tissue == 1.0
    before = sitk.GetArrayFromImage(image)[inner]
    assert np.std(out[inner]) / np.mean(out[inner]) < 0.5 * np.std(before) / np.mean(before)
    assert sitk.GetArrayFromImage(log_bias).shape == out.shape
    same, _ = core.n4_bias_correct(image, shrink=4, iterations=(20, 20))  # one factor: capped per axis (16 voxels)
    assert np.isfinite(sitk.GetArrayFromImage(same)).all()
    with pytest.raises(ValueError, match="one per axis"):
        core.n4_bias_correct(image, shrink=(2, 2))
