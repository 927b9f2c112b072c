"""Axial training slices for contrast imputation, as MONAI dictionary transforms.

A canonical item (``common.data`` datalists) -> ``LoadCanonicald`` of the sources and the target ->
:class:`ImputationPaird` (``source`` = the acquired contrasts as channels, ``target`` = the missing one,
``brain`` = voxels where any source is non-zero, ``mask`` = the binarised tumour label for the lesion-mask
loss) -> ``NonzeroPercentileScaled`` of ``source`` and ``target`` -> :class:`BrainSliceSamplerd` (``batch_samples``
axial slices of one volume, drawn among slices holding brain) -> ``ResizeWithPadOrCropd`` to 256x256.

Intensity normalisation (training, imputation and evaluation alike): per volume and contrast, the 0.5 and 99.5
percentiles of the brain (non-zero voxels) map to 0 and 1, values are clipped to [0, 1], the background stays 0 --
the BraSyn evaluation scaling (``common.metrics.percentile_normalise``), so the network learns on the scale it is
scored on. Inputs are skull-stripped volumes (BraTS releases, ``python -m tools preprocess``): the brain is where
any source is non-zero; on raw scans with a noisy background every slice counts as brain. A MONAI ``DataLoader`` (``list_data_collate``) flattens the per-volume slice lists, so one batch holds
``batch_size * batch_samples`` slices: ``batch_size`` volumes, ``batch_samples`` slices of each (the paper's two
tuned quantities).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, EnsureTyped, MapTransform, RandomizableTransform, ResizeWithPadOrCropd, Transform

from common import CONTRASTS
from common.data.transforms import LoadCanonicald, NonzeroPercentileScaled
from common.io import DataError

KEYS = ("source", "target", "mask", "brain")
SPATIAL_SIZE = (256, 256)
AXIAL = 2  # canonical volumes are (X, Y, Z) with Z inferior -> superior


def check_task(sources: str | Sequence[str], target: str) -> tuple[tuple[str, ...], str]:
    """Validated ``(sources, target)``: canonical contrast ids, at least one source, target not a source."""
    srcs = (sources,) if isinstance(sources, str) else tuple(sources)
    srcs = tuple(s.strip() for part in srcs for s in str(part).split(",") if s.strip())
    if not srcs:
        raise DataError("--source", "no source contrast given; fix: e.g. --source t2w (or t1c,t2w for several)")
    for flag, names in (("--source", srcs), ("--target", (target,))):
        unknown = [c for c in names if c not in CONTRASTS]
        if unknown:
            raise DataError(flag, f"unknown contrast(s) {unknown}; fix: use the canonical ids {CONTRASTS}")
    if len(set(srcs)) != len(srcs):
        raise DataError("--source", f"a contrast is listed twice in {srcs}; fix: list each source once")
    if target in srcs:
        raise DataError("--target", f"target {target!r} is also a source {srcs}; fix: impute a contrast you lack")
    return srcs, target


def check_item(item: Mapping, sources: Sequence[str], target: str | None = None, need_label: bool = False) -> None:
    """``DataError`` naming the file when a source (or the target / label, if needed) is absent from a case."""
    case = item.get("id", "?")
    wanted = [(c, "source contrast") for c in sources] + ([(target, "target contrast")] if target else [])
    if need_label:
        wanted.append(("label", "tumour label (for the lesion-mask loss)"))
    for key, what in wanted:
        path = item.get(key)
        if not path:
            raise DataError(f"case {case}", f"{what} {key} missing (no file for it); fix: add the file or change --source")
        if not Path(path).exists():
            raise DataError(path, f"{what} {key} of case {case} missing; fix: add the file or choose other contrasts")


class CheckImputationItemd(Transform):
    """First transform of the chain: every needed file of the case exists (clear error naming it otherwise)."""

    def __init__(self, sources: Sequence[str], target: str | None, need_label: bool = True):
        self.sources, self.target, self.need_label = tuple(sources), target, need_label

    def __call__(self, data: Mapping) -> dict:
        check_item(data, self.sources, self.target, self.need_label)
        return dict(data)


class ImputationPaird(MapTransform):
    """``image`` (sources then target as channels) -> ``source``, ``target``, ``brain`` and lesion ``mask``.

    ``brain`` is taken before intensity scaling (the scaling clips the darkest brain voxels to 0, which would
    otherwise look like background). ``mask`` = label > 0 (every tumour compartment), float 0/1.
    """

    def __init__(self, n_sources: int, has_target: bool = True, image_key: str = "image",
                 label_key: str | None = "label"):
        super().__init__([image_key], allow_missing_keys=False)
        self.n_sources, self.has_target = n_sources, has_target
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = torch.as_tensor(d.pop(self.image_key))
        expected = self.n_sources + int(self.has_target)
        if image.shape[0] != expected:
            raise ValueError(f"{self.image_key} has {image.shape[0]} channels, expected {expected}")
        d["source"] = image[: self.n_sources].float()
        if self.has_target:
            d["target"] = image[self.n_sources:].float()
        d["brain"] = (d["source"] != 0).any(0, keepdim=True).float()
        if self.label_key is not None and self.label_key in d and isinstance(d[self.label_key], torch.Tensor):
            d["mask"] = (torch.as_tensor(d[self.label_key]) > 0).float()
        return d


class BrainSliceSamplerd(RandomizableTransform, MapTransform):
    """``num_samples`` random slices along ``axis`` of one volume, among those where the brain covers at least
    ``min_brain_fraction`` of the slice; returns a list of dicts of plain ``(C, H, W)`` tensors (+ ``slice``).

    Slices are drawn without replacement while the volume has enough of them. A volume with no brain slice is a
    ``DataError`` naming the case.
    """

    def __init__(self, keys: Sequence[str] = KEYS, num_samples: int = 2, axis: int = AXIAL,
                 min_brain_fraction: float = 0.02, brain_key: str = "brain", allow_missing_keys: bool = True):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if num_samples < 1:
            raise ValueError(f"num_samples (batch samples) must be >= 1, got {num_samples}")
        self.num_samples, self.axis, self.min_brain_fraction, self.brain_key = num_samples, axis, min_brain_fraction, brain_key

    def dali_step(self):
        """The same draw for the DALI loader (``common.data.dali.SliceSample``)."""
        from common.data.dali import SliceSample

        return SliceSample(tuple(self.keys), self.num_samples, self.axis, self.min_brain_fraction, self.brain_key)

    def eligible(self, brain: torch.Tensor) -> np.ndarray:
        """Indices of slices with enough brain."""
        b = torch.as_tensor(brain)[0] > 0
        other = [a for a in range(3) if a != self.axis]
        fraction = b.float().mean(dim=other).cpu().numpy()
        return np.flatnonzero(fraction >= self.min_brain_fraction)

    def __call__(self, data: Mapping) -> list[dict]:
        d = dict(data)
        candidates = self.eligible(d[self.brain_key])
        if candidates.size == 0:
            case = d.get("id") or getattr(d.get("source"), "meta", {}).get("filename_or_obj", "?")
            raise DataError(f"case {case}", f"no slice has >= {self.min_brain_fraction:.0%} brain; fix: check the sources")
        replace = candidates.size < self.num_samples
        picks = self.R.choice(candidates, size=self.num_samples, replace=replace)
        out = []
        for z in picks:
            # volumes other than the sliced keys (the 3-D label) stay behind; ids and paths come along
            sample = {k: v for k, v in d.items() if k not in self.keys and not isinstance(v, torch.Tensor)}
            for key in self.key_iterator(d):
                sample[key] = torch.as_tensor(d[key]).select(self.axis + 1, int(z)).clone()
            sample["slice"] = int(z)
            out.append(sample)
        return out


def apply_chain(chain: Compose, item: Mapping):
    """Run a transform chain on one item, re-raising a ``DataError`` that MONAI wrapped in ``RuntimeError``
    ("applying transform ...") as itself, so the user sees the file and the problem."""
    try:
        return chain(dict(item))
    except RuntimeError as exc:
        cause = exc
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def volume_transforms(sources: Sequence[str], target: str | None, need_label: bool = False) -> Compose:
    """Case -> normalised ``source`` (S, X, Y, Z), ``brain``, and ``target``/``mask`` where given (imputation,
    validation, evaluation)."""
    contrasts = tuple(sources) + ((target,) if target else ())
    keys = ["source"] + (["target"] if target else [])
    return Compose([
        CheckImputationItemd(sources, target, need_label),
        LoadCanonicald(contrasts=contrasts, image_key="image", label_key="label", allow_missing_label=not need_label),
        ImputationPaird(len(sources), has_target=bool(target)),
        NonzeroPercentileScaled(keys=keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0),
    ])


def train_transforms(sources: str | Sequence[str], target: str, batch_samples: int = 2,
                     spatial_size: Sequence[int] = SPATIAL_SIZE, min_brain_fraction: float = 0.02,
                     seed: int | None = 0) -> Compose:
    """The training chain: case -> ``batch_samples`` padded axial slices with ``source``/``target``/``mask``."""
    sources, target = check_task(sources, target)
    sampler = BrainSliceSamplerd(KEYS, num_samples=batch_samples, min_brain_fraction=min_brain_fraction)
    chain = Compose([
        *volume_transforms(sources, target, need_label=True).transforms,
        sampler,
        ResizeWithPadOrCropd(keys=list(KEYS), spatial_size=tuple(spatial_size), mode="constant", value=0),
        EnsureTyped(keys=list(KEYS) + ["slice"], track_meta=False),  # plain tensors: 2-D slices carry no 3-D affine
    ])
    if seed is not None:
        chain.set_random_state(seed=seed)
    return chain


def slice_dataloader(items: Sequence[Mapping], sources, target, batch_size: int = 2, batch_samples: int = 2,
                     spatial_size: Sequence[int] = SPATIAL_SIZE, shuffle: bool = True, num_workers: int = 0,
                     seed: int = 0, cache: bool = False, **kwargs):
    """MONAI DataLoader of ``batch_size`` volumes x ``batch_samples`` slices per batch.

    ``cache=True`` keeps the loaded, normalised volumes in memory (``CacheDataset`` up to the slice draw),
    which is what makes thousands of short iterations on a few volumes fast.
    """
    from monai.data import CacheDataset, DataLoader, Dataset

    chain = train_transforms(sources, target, batch_samples, spatial_size, seed=seed)
    data = [dict(it) for it in items]
    dataset = CacheDataset(data, chain, progress=False) if cache else Dataset(data, chain)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, **kwargs)
