"""One case through the FeTS/BraTS recipe, in memory.

reorient to RAS -> N4 (every contrast) -> rigid co-registration of every contrast to the reference contrast ->
rigid registration of the reference to the atlas -> one resampling per contrast (composed transforms, so each
image is interpolated once) onto the atlas grid at ``spacing`` mm -> brain mask -> crop to the brain -> intensity
normalisation. The label follows the reference's transform with nearest-neighbour interpolation.

Atlas registration of a head (skull, scalp, neck) to nilearn's skull-stripped template: the subject's brain
centre is estimated from the top of its head (the vertex is robust to how much neck the scan holds) and used
to initialise the translation; mutual information is then measured only inside the atlas brain mask dilated
by ``atlas_mask_dilation_mm``, where the template's zero background meets the subject's CSF/skull, so the
scalp and neck do not pull the fit. A sanity check (enough of the atlas brain must land inside the head)
turns a failed registration into a DataError instead of a silently wrong output.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from common.io import DataError, check_choice, check_flag
from common.preprocess import core
from common.preprocess.atlas import Atlas, load_atlas
from common.preprocess.skullstrip import hdbet_brain_mask, resolve_method


@dataclass(frozen=True)
class PreprocessConfig:
    """Every setting that changes the output (stored in each case's record; resume compares it)."""

    reference: str = "t1c"  # contrast registered to the atlas; the others are registered to it (as in CaPTk/FeTS)
    atlas: str | None = None  # None: nilearn MNI152 2009c, 1 mm; else a NIfTI path
    atlas_mask: str | None = None  # brain mask of a custom atlas (needed when the atlas keeps the skull)
    spacing: float = 1.0  # output voxel size (mm), isotropic
    n4: bool = True
    n4_resolution_mm: float = 4.0  # N4 fits on a copy shrunk to about this voxel size (speed)
    n4_iterations: tuple[int, ...] = (50, 50, 50)
    skull_strip: str = "auto"  # auto | atlas | hdbet | none
    mask_dilation_mm: float = 1.0  # widen the atlas brain mask a little: rigid fits leave the cortex edge uncertain
    atlas_mask_dilation_mm: float = 6.0  # region where the atlas registration measures mutual information
    crop: bool = True
    crop_margin: int = 2  # voxels kept around the brain
    normalisation: str = "none"  # none | zscore | percentile
    percentiles: tuple[float, float] = (0.5, 99.5)
    registration_samples: int = 50_000  # mutual-information samples per pyramid level
    registration_finest_mm: float = 2.0  # finest pyramid level; 2 mm is sub-voxel accurate for rigid fits and ~2x faster
    min_atlas_overlap: float = 0.85  # fraction of the atlas brain that must fall inside the subject's head

    def __post_init__(self):
        """Refuse impossible settings here, before the first case: per case they fail only after minutes."""
        import math

        from common import CONTRASTS
        from common.preprocess.skullstrip import SKULL_STRIP_METHODS

        for flag in ("spacing", "n4_resolution_mm"):
            value = getattr(self, flag)
            check_flag(flag, isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                       f"must be a positive number of millimetres, got {value!r}")
        check_choice("normalisation", self.normalisation, core.NORMALISATIONS)
        check_choice("skull_strip", self.skull_strip, SKULL_STRIP_METHODS)
        check_choice("reference", self.reference, CONTRASTS)
        for flag, path in (("atlas", self.atlas), ("atlas_mask", self.atlas_mask)):
            if path is not None and not Path(path).is_file():
                raise DataError(f"--{flag} {path}", "file does not exist")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n4_iterations"] = list(self.n4_iterations)
        d["percentiles"] = list(self.percentiles)
        return d


@dataclass
class PreprocessResult:
    images: dict[str, np.ndarray]  # float32, atlas space, cropped, normalised
    affine: np.ndarray
    brain_mask: np.ndarray  # uint8
    label: np.ndarray | None
    record: dict = field(default_factory=dict)  # transforms, parameters, quality numbers


Volume = tuple[np.ndarray, np.ndarray]  # (array, RAS affine)


def estimate_brain_center(head: sitk.Image, atlas: Atlas, skull_mm: float = 6.0) -> np.ndarray:
    """Subject brain centre (LPS) guessed from the head mask: the atlas's vertex-to-centre depth below the top of
    the head, and the mean left-right / front-back position of the head within one brain height of the top."""
    affine = core.affine_of(head)
    idx = np.argwhere(sitk.GetArrayViewFromImage(head) > 0)[:, ::-1]  # x, y, z voxel indices
    if idx.shape[0] == 0:
        raise ValueError("empty head mask")
    ras = idx @ affine[:3, :3].T + affine[:3, 3]
    a_affine = core.affine_of(atlas.brain_mask)
    a_idx = np.argwhere(sitk.GetArrayViewFromImage(atlas.brain_mask) > 0)[:, ::-1]
    a_ras = a_idx @ a_affine[:3, :3].T + a_affine[:3, 3]
    a_top, a_bottom = a_ras[:, 2].max(), a_ras[:, 2].min()
    a_center = a_ras.mean(axis=0)
    top = ras[:, 2].max()
    slab = ras[ras[:, 2] > top - (a_top - a_bottom) - skull_mm]
    center_ras = np.array([slab[:, 0].mean(), slab[:, 1].mean(), top - skull_mm - (a_top - a_center[2])])
    return np.array([-center_ras[0], -center_ras[1], center_ras[2]])  # RAS -> LPS


def register_to_atlas(reference: sitk.Image, head: sitk.Image, atlas: Atlas, config: PreprocessConfig):
    """Rigid atlas -> subject transform (atlas point -> subject point) and its fraction of atlas brain in the head."""
    atlas_center = core.world_center_of_mass(atlas.brain_mask)
    subject_center = estimate_brain_center(head, atlas)
    initial = sitk.Euler3DTransform()
    initial.SetCenter(atlas_center.tolist())
    initial.SetTranslation((subject_center - atlas_center).tolist())
    fixed_mask = core.dilate_mm(atlas.brain_mask, config.atlas_mask_dilation_mm)
    transform, metric = core.register_rigid(
        atlas.image, reference, initial=initial, fixed_mask=fixed_mask,
        max_samples=config.registration_samples, finest_mm=max(config.registration_finest_mm, 1.0),
    )
    head_in_atlas = core.resample_to(head, atlas.brain_mask, transform, nearest=True)
    brain = sitk.GetArrayViewFromImage(atlas.brain_mask) > 0
    overlap = float((sitk.GetArrayViewFromImage(head_in_atlas)[brain] > 0).mean())
    return transform, metric, overlap


def _check_inputs(case_id: str, images: Mapping[str, Volume], reference: str, label: Volume | None) -> None:
    if reference not in images:
        raise DataError(case_id, f"reference contrast {reference!r} is missing (has: {', '.join(sorted(images))})")
    for name, (array, affine) in images.items():
        array = np.asarray(array)
        if array.ndim != 3:
            raise DataError(case_id, f"{name}: expected a 3D volume, got shape {array.shape}")
        if np.asarray(affine).shape != (4, 4) or abs(np.linalg.det(np.asarray(affine)[:3, :3])) < 1e-9:
            raise DataError(case_id, f"{name}: invalid affine")
        if not np.isfinite(array).all():
            raise DataError(case_id, f"{name}: contains NaN/Inf voxels")
        if np.count_nonzero(array > 0) < 1000:
            raise DataError(case_id, f"{name}: image is (almost) empty")
    if label is not None and np.asarray(label[0]).ndim != 3:
        raise DataError(case_id, f"label: expected a 3D volume, got shape {np.asarray(label[0]).shape}")


def preprocess_case(
    images: Mapping[str, Volume],
    label: Volume | None = None,
    config: PreprocessConfig = PreprocessConfig(),
    atlas: Atlas | None = None,
    case_id: str = "case",
    hdbet_device: str | None = None,
) -> PreprocessResult:
    """Run the whole recipe on one case; errors are DataErrors that name the case."""
    t_start = time.perf_counter()
    _check_inputs(case_id, images, config.reference, label)
    atlas = atlas if atlas is not None else load_atlas(config.atlas, config.atlas_mask)
    skull_strip = resolve_method(config.skull_strip)
    timings: dict[str, float] = {}

    # 1) reorient + N4
    t = time.perf_counter()
    sitk_images: dict[str, sitk.Image] = {}
    heads: dict[str, sitk.Image] = {}
    bias_range: dict[str, list[float]] = {}
    for name, (array, affine) in images.items():
        array, affine = core.reorient_to_ras(np.asarray(array, dtype=np.float32), affine)
        image = core.to_sitk(np.maximum(array, 0.0), affine)
        heads[name] = core.foreground_mask(image)
        if config.n4:
            try:
                image, log_bias = core.n4_bias_correct(
                    image, heads[name], core.n4_shrink_factor(image, config.n4_resolution_mm), config.n4_iterations
                )
            except (ValueError, RuntimeError) as exc:
                raise DataError(case_id, f"{name}: N4 bias correction failed ({exc})") from exc
            field_values = np.exp(sitk.GetArrayViewFromImage(log_bias)[sitk.GetArrayViewFromImage(heads[name]) > 0])
            bias_range[name] = [float(field_values.min()), float(field_values.max())]
        sitk_images[name] = image
    timings["n4"] = time.perf_counter() - t

    # 2) co-registration to the reference contrast (same session: start from the scanner geometry)
    t = time.perf_counter()
    ref = config.reference
    to_reference: dict[str, sitk.Transform] = {ref: sitk.Euler3DTransform()}
    metrics: dict[str, float] = {}
    for name, image in sitk_images.items():
        if name == ref:
            continue
        try:
            transform, metric = core.register_rigid(
                sitk_images[ref], image, fixed_mask=heads[ref],
                max_samples=config.registration_samples, finest_mm=config.registration_finest_mm,
            )
        except RuntimeError as exc:
            raise DataError(case_id, f"{name}: co-registration to {ref} failed ({exc})") from exc
        to_reference[name] = transform
        metrics[name] = metric
    timings["coregistration"] = time.perf_counter() - t

    # 3) reference -> atlas
    t = time.perf_counter()
    try:
        to_atlas, atlas_metric, overlap = register_to_atlas(sitk_images[ref], heads[ref], atlas, config)
    except RuntimeError as exc:
        raise DataError(case_id, f"{ref}: registration to the atlas failed ({exc})") from exc
    if overlap < config.min_atlas_overlap:
        raise DataError(case_id, f"registration to the atlas failed: only {overlap:.0%} of the atlas brain lies "
                                 f"inside the head of {ref} (expected >= {config.min_atlas_overlap:.0%})")
    metrics["atlas"] = atlas_metric
    timings["atlas_registration"] = time.perf_counter() - t

    # 4) one resampling per volume onto the atlas grid at `spacing` mm
    t = time.perf_counter()
    grid = core.grid_like(atlas.image, config.spacing)
    out_affine = core.affine_of(grid)
    full: dict[str, np.ndarray] = {}
    transforms_ras: dict[str, list] = {}
    for name, image in sitk_images.items():
        transform = core.compose(to_reference[name], to_atlas)  # atlas point -> reference point -> contrast point
        full[name] = core.from_sitk(core.resample_to(image, grid, transform))[0].astype(np.float32)
        transforms_ras[name] = core.euler_matrix_ras(to_reference[name]).tolist()
    head_out = core.from_sitk(core.resample_to(heads[ref], grid, to_atlas, nearest=True))[0] > 0
    label_out = None
    if label is not None:
        l_array, l_affine = core.reorient_to_ras(np.asarray(label[0]), label[1])
        l_image = core.to_sitk(l_array, l_affine, sitk.sitkUInt8)
        label_out = core.from_sitk(core.resample_to(l_image, grid, to_atlas, nearest=True))[0].astype(np.uint8)
    timings["resampling"] = time.perf_counter() - t

    # 5) brain mask
    t = time.perf_counter()
    if skull_strip == "atlas":
        atlas_mask = core.dilate_mm(core.resample_to(atlas.brain_mask, grid, nearest=True), config.mask_dilation_mm)
        brain = (core.from_sitk(atlas_mask)[0] > 0) & head_out
    elif skull_strip == "hdbet":
        brain = hdbet_brain_mask(full[ref], out_affine, device=hdbet_device)
    else:  # none: the head foreground
        brain = head_out.copy()
    if label_out is not None:
        brain |= label_out > 0  # never cut the tumor away
    if not brain.any():
        raise DataError(case_id, "brain mask is empty after skull stripping")
    timings["skull_strip"] = time.perf_counter() - t

    # 6) crop + mask + normalise
    box = core.bounding_box(brain, config.crop_margin) if config.crop else tuple((0, s) for s in brain.shape)
    brain_c, affine_c = core.crop(brain.astype(np.uint8), out_affine, box)
    outputs: dict[str, np.ndarray] = {}
    norm_stats: dict[str, dict] = {}
    for name, array in full.items():
        cropped = core.crop(array, out_affine, box)[0]
        if skull_strip == "none":
            outputs[name], norm_stats[name] = core.normalise(cropped, np.ones_like(brain_c), config.normalisation,
                                                             config.percentiles)
        else:
            outputs[name], norm_stats[name] = core.normalise(cropped, brain_c, config.normalisation, config.percentiles)
    label_c = core.crop(label_out, out_affine, box)[0] if label_out is not None else None

    record = {
        "case_id": case_id,
        "config": config.to_dict(),
        "atlas": atlas.name,
        "skull_strip": skull_strip,
        "reference": ref,
        "output_shape": list(brain_c.shape),
        "output_affine": affine_c.tolist(),
        "crop_box": [list(b) for b in box],
        # 4x4 RAS matrices mapping points of one space to another (the resampling direction)
        "transforms": {
            "atlas_to_reference": core.euler_matrix_ras(to_atlas).tolist(),
            "reference_to_contrast": transforms_ras,
        },
        "registration": {"mattes_mi": metrics, "atlas_brain_inside_head": overlap},
        "n4_bias_range": bias_range,
        "normalisation": norm_stats,
        "timings_s": {k: round(v, 2) for k, v in {**timings, "total": time.perf_counter() - t_start}.items()},
    }
    return PreprocessResult(images=outputs, affine=affine_c, brain_mask=brain_c, label=label_c, record=record)
