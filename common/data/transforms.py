"""MONAI dictionary transforms the bundles need and MONAI lacks; everything else comes from ``monai.transforms``
(CropForegroundd, NormalizeIntensityd(nonzero=True), ScaleIntensityRangePercentilesd, RandFlipd, AsDiscreted ...).

Tensors are channel-first ``(C, X, Y, Z)`` MetaTensors; labels are ``(1, X, Y, Z)`` float32 holding integer values.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Pad, RandomizableTransform, ResizeWithPadOrCrop, SpatialCrop, Zoom
from monai.utils import convert_to_dst_type, ensure_tuple_rep

from common import CONTRASTS
from common.data.labels import convert_labels, get_scheme
from common.io import DataError, load_nifti


def _where(d: Mapping, key: Hashable) -> str:
    """Best description of the case for error messages."""
    value = d.get(key)
    meta = getattr(value, "meta", {}) or {}
    return str(d.get("id") or meta.get("case_id") or meta.get("filename_or_obj") or key)


class LoadCanonicald(MapTransform):
    """Load a canonical item's contrasts (also from an MSD 4-D file) into one multi-channel ``image`` + ``label``.

    ``contrasts`` picks and orders the channels (e.g. ``("t2f",)`` for a FLAIR-only model). Items from
    ``common.data.layouts``/``load_datalist`` carry paths under the contrast keys and, for MSD, a
    ``<contrast>_channel`` index into the 4-D file (read once per file). Shapes and affines must agree
    (``DataError`` naming the file otherwise). The path keys are left in place for provenance; other ``None``
    values (a ``null`` grade or label path) become ``""`` because PyTorch cannot batch ``None``.
    """

    def __init__(
        self,
        contrasts: Sequence[str] = CONTRASTS,
        image_key: str = "image",
        label_key: str | None = "label",
        allow_missing_label: bool = False,
        dtype: torch.dtype = torch.float32,
        label_dtype: torch.dtype = torch.float32,
        affine_atol: float = 1e-3,
    ):
        super().__init__(list(contrasts), allow_missing_keys=False)
        unknown = [c for c in contrasts if c not in CONTRASTS]
        if unknown:
            raise ValueError(f"unknown contrasts {unknown}; canonical ones are {CONTRASTS}")
        self.contrasts = tuple(contrasts)
        self.image_key = image_key
        self.label_key = label_key
        self.allow_missing_label = allow_missing_label
        self.dtype = dtype
        self.label_dtype = label_dtype
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        case = d.get("id", "?")
        cache: dict[str, tuple] = {}

        def read(path, channel=None):
            if path is None:
                raise DataError(f"case {case}", "item has no path for a requested contrast")
            key = str(path)
            if key not in cache:
                array, affine, _ = load_nifti(path, dtype=np.float32)
                cache[key] = (array, affine)
            array, affine = cache[key]
            if channel is not None:
                if array.ndim != 4 or array.shape[3] <= channel:
                    raise DataError(path, f"needs channel {channel} of a 4-D image, image has shape {array.shape}")
                array = array[..., channel]
            elif array.ndim == 4 and array.shape[3] == 1:
                array = array[..., 0]
            if array.ndim != 3:
                raise DataError(path, f"expected a 3-D volume, got shape {array.shape}")
            return array, affine

        channels, ref_affine, ref_path = [], None, None
        for c in self.contrasts:
            if c not in d:
                raise DataError(f"case {case}", f"item has no {c!r} entry (keys: {sorted(map(str, d))})")
            array, affine = read(d[c], d.get(f"{c}_channel"))
            if ref_affine is None:
                ref_affine, ref_path, ref_shape = affine, d[c], array.shape
            self._check_same_grid(d[c], array.shape, affine, ref_path, ref_shape, ref_affine)
            channels.append(array)
        meta = {
            "filename_or_obj": str(ref_path),
            "case_id": case,
            "original_affine": np.asarray(ref_affine),
            "spatial_shape": np.asarray(ref_shape),
            "original_channel_dim": 0,
            "space": "RAS",
        }
        affine_t = torch.as_tensor(np.asarray(ref_affine), dtype=torch.float64)
        image = torch.from_numpy(np.stack(channels)).to(self.dtype)
        d[self.image_key] = MetaTensor(image, affine=affine_t, meta=dict(meta))  # MetaTensor adds keys to its meta

        if self.label_key is not None:
            path = d.get(self.label_key)
            if path is None:
                if not self.allow_missing_label:
                    raise DataError(f"case {case}", "item has no label (use allow_missing_label=True for images only)")
                d.pop(self.label_key, None)
            else:
                array, affine = read(path)
                self._check_same_grid(path, array.shape, affine, ref_path, ref_shape, ref_affine)
                label_meta = dict(meta, filename_or_obj=str(path))
                d[self.label_key] = MetaTensor(
                    torch.from_numpy(array[None]).to(self.label_dtype), affine=affine_t.clone(), meta=label_meta
                )
        return {k: ("" if v is None else v) for k, v in d.items()}

    def _check_same_grid(self, path, shape, affine, ref_path, ref_shape, ref_affine):
        if tuple(shape) != tuple(ref_shape):
            raise DataError(path, f"shape {tuple(shape)} differs from {ref_path}'s {tuple(ref_shape)}")
        if not np.allclose(affine, ref_affine, rtol=0, atol=self.affine_atol):
            raise DataError(path, f"affine differs from {ref_path}'s: the files are not on one voxel grid")


class ConvertLabelSchemed(MapTransform):
    """Convert label volumes between schemes (see ``common.data.labels.convert_labels`` for ``lossy``)."""

    def __init__(self, keys: KeysCollection, src: str, dst: str, lossy: str = "error", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.src, self.dst, self.lossy = get_scheme(src).name, get_scheme(dst).name, lossy

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            array = d[key].detach().cpu().numpy() if isinstance(d[key], torch.Tensor) else np.asarray(d[key])
            converted = convert_labels(array, self.src, self.dst, self.lossy, where=_where(d, key))
            d[key] = convert_to_dst_type(converted, d[key], dtype=getattr(d[key], "dtype", None))[0]
        return d


class NonzeroPercentileScaled(MapTransform):
    """Scale each channel so its non-zero voxels' ``lower``/``upper`` percentiles map to ``b_min``/``b_max``.

    MONAI's ScaleIntensityRangePercentilesd takes percentiles over all voxels, so the zero background of a
    skull-stripped scan drags the lower percentile to 0; here the background stays exactly ``b_min``
    (0 for the [0, 1] of Med-DDPM/GliomaGen, -1 for [-1, 1]).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        lower: float = 0.5,
        upper: float = 99.5,
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.b_min, self.b_max, self.clip = lower, upper, b_min, b_max, clip

    def scale(self, img: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(img, self.b_min, dtype=torch.float32)
        for c in range(img.shape[0]):
            x = img[c].float()
            nonzero = x != 0
            if not nonzero.any():
                continue
            lo, hi = (float(v) for v in np.percentile(x[nonzero].cpu().numpy(), [self.lower, self.upper]))
            span = (hi - lo) or 1.0
            y = (x - lo) / span * (self.b_max - self.b_min) + self.b_min
            if self.clip:
                y = y.clamp(self.b_min, self.b_max)
            out[c] = torch.where(nonzero, y, torch.full_like(y, self.b_min))
        return out

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            d[key] = convert_to_dst_type(self.scale(img), d[key], dtype=torch.float32)[0]
        return d


class RandScaleZeroPadd(RandomizableTransform, MapTransform):
    """Random isotropic scaling, then zero-pad / centre-crop to ``spatial_size`` (LDM-3D's augmentation).

    With ``fit=True`` the volume is first scaled (aspect ratio kept) so it fits ``spatial_size`` -- e.g. a
    cropped brain into 128x128x64 -- and the random factor from ``scale_range`` multiplies that; with
    ``fit=False`` only the random factor applies. Every key gets the same geometry; ``mode`` per key
    (``nearest`` for labels). Without the random draw (``prob``) the factor is 1, so the output size is always
    ``spatial_size``. Background must be 0 (e.g. after NormalizeIntensityd(nonzero=True)).
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        scale_range: tuple[float, float] = (0.9, 1.1),
        fit: bool = True,
        prob: float = 1.0,
        mode: str | Sequence[str] = ("trilinear", "nearest"),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be positive and ordered, got {scale_range}")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.scale_range = tuple(scale_range)
        self.fit = fit
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.factor = 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.factor = float(self.R.uniform(*self.scale_range)) if self._do_transform else 1.0

    def zoom_for(self, spatial_shape: Sequence[int]) -> float:
        base = min(t / s for t, s in zip(self.spatial_size, spatial_shape)) if self.fit else 1.0
        return base * self.factor

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize()
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        zoom = self.zoom_for(d[first].shape[1:])
        resize = ResizeWithPadOrCrop(self.spatial_size, mode="constant", value=0)
        for key, mode in self.key_iterator(d, self.mode):
            align = None if mode in ("nearest", "nearest-exact", "area") else False
            zoomed = Zoom(zoom, mode=mode, keep_size=False, align_corners=align)(d[key])
            d[key] = resize(zoomed)
        return d


class TumorROId(MapTransform):
    """Fixed-size box centred on the tumour, image multiplied by the binarised label, scaled to ``output_range``.

    The VQGAN+transformer preprocessing (Zhou et al.): a 128^3 FLAIR tumour ROI. The box is centred on the
    tumour's bounding box and zero-padded where it leaves the volume. Inside the mask the intensities'
    ``percentiles`` map linearly to ``output_range``; everything outside the mask is ``output_range[0]``.
    ``tumor_values`` (default: every non-zero label) defines the mask; ``keys`` are the images, the label is
    cropped too. An empty mask is a ``DataError`` naming the case.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str = "label",
        roi_size: Sequence[int] = (128, 128, 128),
        tumor_values: Sequence[int] | None = None,
        mask_image: bool = True,
        output_range: tuple[float, float] | None = (-1.0, 1.0),
        percentiles: tuple[float, float] = (0.0, 100.0),
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.roi_size = tuple(int(s) for s in roi_size)
        self.tumor_values = None if tumor_values is None else list(tumor_values)
        self.mask_image = mask_image
        self.output_range = output_range
        self.percentiles = percentiles

    def tumor_mask(self, label: torch.Tensor) -> torch.Tensor:
        lab = torch.as_tensor(label)[0]
        if self.tumor_values is None:
            return lab != 0
        return torch.isin(lab, torch.as_tensor(self.tumor_values, dtype=lab.dtype))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mask = self.tumor_mask(d[self.label_key])
        if not mask.any():
            raise DataError(f"case {_where(d, self.label_key)}", "label has no tumour voxels: no ROI to crop")
        coords = torch.nonzero(mask)
        center = ((coords.min(0).values + coords.max(0).values + 1) // 2).tolist()
        shape = mask.shape
        start = [c - r // 2 for c, r in zip(center, self.roi_size)]
        end = [s + r for s, r in zip(start, self.roi_size)]
        pad = [(max(0, -s), max(0, e - n)) for s, e, n in zip(start, end, shape)]
        padder = Pad([(0, 0)] + pad, mode="constant", value=0)
        cropper = SpatialCrop(
            roi_start=[s + p[0] for s, p in zip(start, pad)], roi_end=[e + p[0] for e, p in zip(end, pad)]
        )
        for key in list(self.key_iterator(d)) + [self.label_key]:
            d[key] = cropper(padder(d[key]))
        roi_mask = self.tumor_mask(d[self.label_key])[None]
        for key in self.key_iterator(d):
            img = d[key]
            out = torch.as_tensor(img).float().clone()
            if self.output_range is not None:
                out = self._scale(out, roi_mask)
            if self.mask_image:
                background = self.output_range[0] if self.output_range is not None else 0.0
                out = torch.where(roi_mask, out, torch.full_like(out, background))
            d[key] = convert_to_dst_type(out, img, dtype=torch.float32)[0]
        return d

    def _scale(self, img: torch.Tensor, roi_mask: torch.Tensor) -> torch.Tensor:
        low, high = self.output_range
        out = img.clone()
        for c in range(img.shape[0]):
            values = img[c][roi_mask[0]]
            lo, hi = np.percentile(values.numpy(), self.percentiles)
            span = float(hi - lo) or 1.0
            out[c] = ((img[c] - float(lo)) / span * (high - low) + low).clamp(low, high)
        return out


class AddHeadLabeld(MapTransform):
    """Add GliomaGen's ``head`` label (six_label value 1) from the image's non-zero voxels, without holes.

    The head mask is every voxel where any channel of ``image_key`` exceeds ``threshold`` in absolute value,
    closed morphologically (``closing_iterations``) and hole-filled in 3-D and slice by slice along each axis
    (holes open to the border of a slice, e.g. the ventricles in a skull-stripped scan seen at the edge, are
    closed that way). The label is converted from ``src_scheme`` to ``six_label``; only background becomes head,
    tumour labels are never overwritten.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        src_scheme: str = "brats2024",
        threshold: float = 0.0,
        closing_iterations: int = 2,
        lossy: str = "error",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.src_scheme = get_scheme(src_scheme).name
        self.threshold = threshold
        self.closing_iterations = closing_iterations
        self.lossy = lossy

    def head_mask(self, image) -> np.ndarray:
        from scipy import ndimage

        img = torch.as_tensor(image).detach().cpu().numpy()
        mask = (np.abs(img) > self.threshold).any(axis=0)
        if self.closing_iterations > 0:
            k = self.closing_iterations
            padded = np.pad(mask, k)
            padded = ndimage.binary_closing(padded, structure=ndimage.generate_binary_structure(3, 1), iterations=k)
            mask = padded[k:-k, k:-k, k:-k]
        mask = ndimage.binary_fill_holes(mask)
        for axis in range(3):
            moved = np.moveaxis(mask, axis, 0)
            for i in range(moved.shape[0]):
                moved[i] = ndimage.binary_fill_holes(moved[i])
        return mask

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        head = self.head_mask(d[self.image_key])
        for key in self.key_iterator(d):
            label = d[key]
            array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
            six = convert_labels(array, self.src_scheme, "six_label", self.lossy, where=_where(d, key))
            six[(six == 0) & head[None]] = get_scheme("six_label").value_of["head"]
            d[key] = convert_to_dst_type(six, label, dtype=getattr(label, "dtype", None))[0]
        return d
