"""Image-processing steps of the FeTS-style pipeline, on in-memory volumes (SimpleITK does the heavy lifting).

Arrays follow nibabel's convention (voxel order i, j, k; a 4x4 affine to RAS+ millimetres); SimpleITK works in
LPS physical space with (z, y, x) arrays. ``to_sitk``/``from_sitk`` are the only places that know both.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------------------------- conversion
def to_sitk(array: np.ndarray, affine: np.ndarray, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """nibabel-style (array, RAS affine) -> SimpleITK image in LPS physical space."""
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {arr.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    image = sitk.Cast(image, pixel_type)
    matrix = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length voxel axis: {affine}")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix / spacing).flatten().tolist())
    image.SetOrigin((_RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]).tolist())
    return image


def affine_of(image: sitk.Image) -> np.ndarray:
    """The RAS 4x4 voxel-to-world affine of a SimpleITK image."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ (direction * np.asarray(image.GetSpacing()))
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.GetOrigin())
    return affine


def from_sitk(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (array in i, j, k order, RAS affine)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), affine_of(image)


def reorient_to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute voxel axes to the closest RAS orientation (data untouched, no interpolation)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, target):  # already RAS
        return np.asarray(array), np.asarray(affine, dtype=np.float64)
    new_array = nib.orientations.apply_orientation(np.asarray(array), transform)
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(transform, np.shape(array))
    return np.ascontiguousarray(new_array), new_affine


# ----------------------------------------------------------------------------------------------- masks
def foreground_mask(image: sitk.Image, fraction: float = 0.08) -> sitk.Image:
    """Head (not brain) foreground as uint8 0/1: above ``fraction`` of the robust 2-98 % range (as FSL BET does;
    Otsu splits bright fat from the rest on T1), largest component, closed, holes (dark skull, sinuses) filled."""
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = np.percentile(values, [2, 98])
    if not hi > lo:
        return sitk.Cast(image > lo, sitk.sitkUInt8)
    above = sitk.Cast(image > float(lo + fraction * (hi - lo)), sitk.sitkUInt8)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(above), sortByObjectSize=True)
    largest = sitk.Cast(components == 1, sitk.sitkUInt8)
    closed = sitk.BinaryMorphologicalClosing(largest, [2, 2, 2])
    return sitk.Cast(sitk.BinaryFillhole(closed), sitk.sitkUInt8)


def dilate_mm(mask: sitk.Image, radius_mm: float) -> sitk.Image:
    """Binary dilation by about ``radius_mm`` (ball in physical units)."""
    if radius_mm <= 0:
        return mask
    radius = [max(1, int(round(radius_mm / s))) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(sitk.Cast(mask, sitk.sitkUInt8), radius, sitk.sitkBall)


def world_center_of_mass(mask: sitk.Image) -> np.ndarray:
    """Centre of mass of a binary mask in LPS physical coordinates."""
    arr = sitk.GetArrayViewFromImage(mask) > 0  # z, y, x
    idx = np.argwhere(arr)
    if idx.size == 0:
        raise ValueError("empty mask has no centre of mass")
    mean_zyx = idx.mean(axis=0)
    return np.asarray(mask.TransformContinuousIndexToPhysicalPoint(mean_zyx[::-1].tolist()))


# ----------------------------------------------------------------------------------------------- N4
def n4_shrink_factor(image: sitk.Image, resolution_mm: float = 4.0, min_size: int = 16) -> tuple[int, int, int]:
    """Per-axis shrink factors that fit the bias field on voxels of about ``resolution_mm`` (ANTs' shrink 4 on
    1 mm scans), keeping at least ``min_size`` voxels along each axis.

    Per axis, so a 1x1x7 mm scan shrinks 4x4x1 (not 1x1x1, which ran N4 at full in-plane resolution: 10-15x
    slower than the same case at 1 mm).
    """
    factors = []
    for spacing, size in zip(image.GetSpacing(), image.GetSize()):
        f = max(1, int(round(resolution_mm / spacing)))
        factors.append(int(max(1, min(f, size // min_size))))
    return tuple(factors)


def n4_bias_correct(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    shrink: int | Sequence[int] = 4,
    iterations: Sequence[int] = (50, 50, 50),
    spline_distance_mm: float | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """N4 on a shrunk copy (speed), bias field evaluated at full resolution -> (corrected, log_bias_field).

    The fit runs on the head foreground; the smooth field is extrapolated to the background, which is then
    left untouched (corrected values there are only divided by a smooth positive field).
    """
    image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = foreground_mask(image)
    mask = sitk.Cast(mask, sitk.sitkUInt8) * sitk.Cast(image > 0, sitk.sitkUInt8)  # N4 fits log intensities
    if sitk.GetArrayViewFromImage(mask).sum() < 100:
        raise ValueError("too few foreground voxels for bias-field correction")
    # one factor per axis; keep at least 16 voxels along every axis of the shrunk image
    factors = [shrink] * 3 if isinstance(shrink, (int, np.integer)) else list(shrink)
    if len(factors) != 3:
        raise ValueError(f"shrink needs one factor or three (one per axis), got {shrink!r}")
    factors = [int(max(1, min(f, n // 16))) for f, n in zip(factors, image.GetSize())]
    small = sitk.Shrink(image, factors) if max(factors) > 1 else image
    small_mask = sitk.Shrink(mask, factors) if max(factors) > 1 else mask
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    if spline_distance_mm:
        extent = np.asarray(small.GetSize()) * np.asarray(small.GetSpacing())
        corrector.SetNumberOfControlPoints([max(4, int(math.ceil(e / spline_distance_mm)) + 3) for e in extent])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    corrected = sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)
    return corrected, log_bias


# ----------------------------------------------------------------------------------------------- registration
def _shrink_factors(image: sitk.Image, finest_mm: float, levels: int) -> list[int]:
    """Pyramid factors whose finest level is about ``finest_mm`` (never finer than the voxels)."""
    spacing = min(image.GetSpacing())
    finest = max(1, int(round(finest_mm / spacing)))
    return [finest * 2 ** (levels - 1 - i) for i in range(levels)]


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform | None = None,
    fixed_mask: sitk.Image | None = None,
    levels: int = 3,
    finest_mm: float = 1.0,
    sampling: float = 0.1,
    max_samples: int = 60_000,
    iterations: int = 200,
    bins: int = 32,
    seed: int = 20240725,
) -> tuple[sitk.Euler3DTransform, float]:
    """Rigid (Euler3D) registration by Mattes mutual information, coarse to fine.

    Returns the transform that maps fixed-space points to moving-space points (the ITK convention, the one a
    resampler wants) and the final metric value. Sampling is random with a fixed seed, capped at
    ``max_samples`` points per level, so results are reproducible and the cost does not grow with the image.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if initial is None:
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
        )
    transform = sitk.Euler3DTransform(initial)
    factors = _shrink_factors(fixed, finest_mm, levels)
    n_voxels = np.prod(fixed.GetSize())
    if fixed_mask is not None:
        n_voxels = max(1, int(sitk.GetArrayViewFromImage(fixed_mask).astype(bool).sum()))
    # fraction of the (shrunk) voxels that gives at most max_samples points per level
    percentages = [float(min(1.0, sampling * f**3, max_samples * f**3 / n_voxels)) for f in factors]

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(percentages, seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.Cast(fixed_mask, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(factors)
    reg.SetSmoothingSigmasPerLevel([0.5 * f * min(fixed.GetSpacing()) for f in factors])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return transform, float(reg.GetMetricValue())


def euler_matrix_ras(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of an affine-like ITK transform in RAS millimetres (fixed point -> moving point)."""
    lps = np.eye(4)
    t = sitk.AffineTransform(3)
    t.SetMatrix(transform.GetMatrix())
    t.SetTranslation(transform.GetTranslation())
    t.SetCenter(transform.GetCenter())
    matrix = np.asarray(t.GetMatrix()).reshape(3, 3)
    center = np.asarray(t.GetCenter())
    lps[:3, :3] = matrix
    lps[:3, 3] = np.asarray(t.GetTranslation()) + center - matrix @ center
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def rigid_from_ras(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    """ITK transform from a 4x4 RAS matrix (fixed point -> moving point); inverse of ``euler_matrix_ras``."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.asarray(matrix_ras, dtype=np.float64) @ flip
    t = sitk.AffineTransform(3)
    t.SetMatrix(lps[:3, :3].flatten().tolist())
    t.SetTranslation(lps[:3, 3].tolist())
    return t


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """``compose(a, b)`` maps p -> a(b(p)): the first transform is applied last, like function composition."""
    return sitk.CompositeTransform([sitk.Transform(t) for t in transforms])


def rotation_error_deg(matrix_a: np.ndarray, matrix_b: np.ndarray) -> float:
    """Angle (degrees) of the rotation between two 4x4 rigid matrices."""
    rel = np.asarray(matrix_a)[:3, :3] @ np.asarray(matrix_b)[:3, :3].T
    return float(np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1.0, 1.0))))


# ----------------------------------------------------------------------------------------------- resampling
def resample_to(
    image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None = None, nearest: bool = False
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (reference point -> image point)."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    transform = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    return sitk.Resample(image, reference, transform, interpolator, 0.0, image.GetPixelID())


def grid_like(atlas: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An empty image covering the atlas field of view at isotropic ``spacing_mm`` voxels."""
    old_spacing = np.asarray(atlas.GetSpacing())
    extent = np.asarray(atlas.GetSize()) * old_spacing
    size = [int(math.ceil(e / spacing_mm - 1e-6)) for e in extent]
    direction = np.asarray(atlas.GetDirection()).reshape(3, 3)
    # keep the outer corner of the field of view, move the first voxel centre accordingly
    corner = np.asarray(atlas.GetOrigin()) - direction @ (0.5 * old_spacing)
    origin = corner + direction @ np.full(3, 0.5 * spacing_mm)
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetDirection(atlas.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, int], ...]:
    """(lo, hi) index ranges (hi exclusive) of the non-zero voxels, widened by ``margin`` inside the volume."""
    idx = np.argwhere(np.asarray(mask) > 0)
    if idx.size == 0:
        raise ValueError("empty brain mask: nothing to crop to")
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, np.shape(mask))
    return tuple((int(a), int(b)) for a, b in zip(lo, hi))


def crop(array: np.ndarray, affine: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """Crop a volume to ``box`` and shift the affine so world coordinates are unchanged."""
    slices = tuple(slice(lo, hi) for lo, hi in box)
    shift = np.eye(4)
    shift[:3, 3] = [lo for lo, _ in box]
    return np.ascontiguousarray(np.asarray(array)[slices]), np.asarray(affine) @ shift


# ----------------------------------------------------------------------------------------------- intensities
NORMALISATIONS = ("none", "zscore", "percentile")


def normalise(
    array: np.ndarray, mask: np.ndarray, method: str = "zscore", percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[np.ndarray, dict]:
    """Intensity normalisation inside the brain; the background is set to 0.

    zscore: mean/std of the non-zero brain voxels (the LDM paper's choice); percentile: clip to the brain's
    [p_lo, p_hi] percentiles and rescale to [0, 1] (GliomaGen/Med-DDPM); none: masking only.
    """
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {NORMALISATIONS}")
    arr = np.asarray(array, dtype=np.float32)
    inside = np.asarray(mask) > 0
    out = np.where(inside, arr, 0.0).astype(np.float32)
    values = out[inside & (out != 0)]
    stats: dict = {"method": method}
    if method == "none" or values.size == 0:
        return out, stats
    if method == "zscore":
        mean, std = float(values.mean()), float(values.std())
        std = std if std > 0 else 1.0
        out = np.where(inside & (out != 0), (out - mean) / std, 0.0).astype(np.float32)
        stats.update(mean=mean, std=std)
    else:
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        scale = hi - lo if hi > lo else 1.0
        out = np.where(inside, np.clip((out - lo) / scale, 0.0, 1.0), 0.0).astype(np.float32)
        stats.update(low=lo, high=hi, percentiles=list(percentiles))
    return out, stats
