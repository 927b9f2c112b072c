"""NVIDIA DALI for the training data: the deterministic chain decoded once into arrays, the random augmentations
run by a DALI pipeline (on the GPU when training runs there, on the CPU otherwise).

A bundle's training data is ``CacheDataset(items, Compose(deterministic + augmentations + [to_tensor]))``. The
DALI path keeps that definition: :class:`ArrayCache` runs the deterministic part (loading, label conversion,
crop, normalisation, fit to the grid: everything up to the first random transform) once per case with MONAI and
stores each key as ``.npy``; :func:`augmentation_plan` translates the random part into DALI operators; and
:class:`DaliAugmenter` runs them. The random draws (flip or not, scale factor) are made on the host from a seed
per sample and fed to the pipeline, so a sample's augmentation depends only on ``(seed, epoch, index)``, as it
does on the MONAI path: a resumed run sees the same data (``common.engines.data.DaliLoader`` wires the order).
MONAI random transforms without a DALI equivalent are refused by name, before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.io import DataError

INSTALL_HINT = "pip install nvidia-dali-cuda120 (or -cuda130; CPU pipelines need no GPU)"


def require_dali():
    """The ``nvidia.dali`` module, or a one-line error saying how to install it."""
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise DataError("loader", f"'dali' needs NVIDIA DALI, which is not installed ({exc}); fix: {INSTALL_HINT}, "
                                  "or use --loader monai") from None
    return dali


def dali_available() -> bool:
    try:
        require_dali()
    except DataError:
        return False
    return True


def split_chain(transform) -> tuple[list, list]:
    """(deterministic, random) parts of a MONAI ``Compose``: the split CacheDataset caches at, the first
    random transform. The trailing type conversion (``EnsureTyped``/``ToTensord``) is dropped: arrays are cached."""
    from monai.transforms import Compose, EnsureTyped, RandomizableTrait, ToTensord

    transforms = list(transform.transforms if isinstance(transform, Compose) else transform)
    first = next((i for i, t in enumerate(transforms) if isinstance(t, RandomizableTrait)), len(transforms))
    conversion = (EnsureTyped, ToTensord)
    deterministic = [t for t in transforms[:first] if not isinstance(t, conversion)]
    random = [t for t in transforms[first:] if not isinstance(t, conversion)]
    return deterministic, random


# --------------------------------------------------------------------------------------------- augmentations
@dataclass(frozen=True)
class Flip:
    """MONAI ``RandFlipd``: each listed spatial axis flipped together with probability ``prob``."""

    keys: tuple
    prob: float
    axes: tuple  # spatial axes of [C, *spatial] arrays


@dataclass(frozen=True)
class ScaleZeroPad:
    """``common.data.transforms.RandScaleZeroPadd``: zoom (fit to the grid times a random factor), then
    zero-pad / centre-crop to ``spatial_size``; linear for images, nearest for labels."""

    keys: tuple
    modes: tuple
    spatial_size: tuple
    scale_range: tuple
    fit: bool
    prob: float


@dataclass(frozen=True)
class PadCrop:
    """MONAI ``ResizeWithPadOrCropd`` after a random transform: zero-pad / centre-crop to ``spatial_size``."""

    keys: tuple
    spatial_size: tuple


@dataclass(frozen=True)
class SliceSample:
    """2-D slices drawn from each volume (a transform's ``dali_step()``, e.g. the imputation bundle's
    ``BrainSliceSamplerd``): ``num_samples`` slices along ``axis`` among those where ``brain_key`` covers at least
    ``min_fraction``, without replacement while there are enough. Cut on the host from the cached volume (a copy
    of planes); the steps after it run in DALI on 2-D images."""

    keys: tuple
    num_samples: int
    axis: int
    min_fraction: float
    brain_key: str
    index_key: str = "slice"

    def eligible(self, brain: np.ndarray) -> np.ndarray:
        other = tuple(a for a in range(3) if a != self.axis)
        return np.flatnonzero((brain[0] > 0).mean(axis=other) >= self.min_fraction)

    def picks(self, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(eligible, size=self.num_samples, replace=eligible.size < self.num_samples)


def augmentation_plan(transforms: Sequence) -> list:
    """DALI steps for MONAI random transforms; a transform with no DALI equivalent is refused by name."""
    from monai.transforms import RandFlipd, ResizeWithPadOrCropd

    from common.data.transforms import RandScaleZeroPadd

    plan = []
    for t in transforms:
        if hasattr(t, "dali_step"):  # a transform of a method module that declares its DALI equivalent
            plan.append(t.dali_step())
        elif isinstance(t, ResizeWithPadOrCropd):
            plan.append(PadCrop(tuple(t.keys), tuple(int(v) for v in t.padder.padder.spatial_size)))
        elif isinstance(t, RandFlipd):
            axis = t.flipper.spatial_axis
            axes = (0, 1, 2) if axis is None else tuple(np.atleast_1d(axis).tolist())
            plan.append(Flip(tuple(t.keys), float(t.prob), axes))
        elif isinstance(t, RandScaleZeroPadd):
            plan.append(ScaleZeroPad(tuple(t.keys), tuple(t.mode), t.spatial_size, tuple(t.scale_range), t.fit,
                                     float(t.prob)))
        else:
            raise DataError("loader", f"augmentation {type(t).__name__} has no DALI equivalent in this project "
                                      "(supported: RandFlipd, RandScaleZeroPadd, ResizeWithPadOrCropd, BrainSliceSamplerd); fix: --loader monai")
    return plan


def draw(plan: Sequence, seed: int | Sequence[int], shapes: Mapping[str, tuple]) -> list[dict]:
    """The random parameters of one sample, drawn from its own seed, per step: ``{"flip": 0 or 1}``,
    ``{"size": [spatial size after the zoom], "anchor": [start of the pad/crop window]}`` or ``{"anchor": ...}``;
    ``shapes``: the sample's array shapes as they enter the plan."""
    rng = np.random.default_rng(seed)
    spatial = list(next(iter(shapes.values()))[1:])
    params = []
    for step in plan:
        if isinstance(step, SliceSample):
            raise ValueError("SliceSample runs on the host before the pipeline (DaliLoader), not in draw()")
        if isinstance(step, PadCrop):
            params.append({"anchor": _window(spatial, step.spatial_size)})
            spatial = list(step.spatial_size)
        elif isinstance(step, Flip):
            params.append({"flip": int(rng.random() < step.prob)})
        else:
            factor = float(rng.uniform(*step.scale_range)) if rng.random() < step.prob else 1.0
            base = min(t / n for t, n in zip(step.spatial_size, spatial)) if step.fit else 1.0
            size = [max(1, int(np.floor(n * base * factor))) for n in spatial]
            params.append({"size": size, "anchor": _window(size, step.spatial_size)})
            spatial = list(step.spatial_size)
    return params


def _window(size: Sequence[int], target: Sequence[int]) -> list[int]:
    """Start of MONAI's ResizeWithPadOrCrop window: pad (out - in) // 2 before, or crop from in // 2 - out // 2."""
    return [(n // 2 - t // 2) if n > t else -((t - n) // 2) for n, t in zip(size, target)]


def chain_signature(transform, depth: int = 0):
    """A transform's type and its plain settings (numbers, strings, their sequences, nested transforms' settings),
    for the cache fingerprint."""
    plain = (str, int, float, bool, type(None))

    def value(v, d):
        if isinstance(v, plain):
            return v
        if isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v):
            return list(v)
        if d < 2 and hasattr(v, "__dict__") and hasattr(v, "__call__"):
            return chain_signature(v, d + 1)
        return None

    settings = {k: value(v, depth) for k, v in sorted(vars(transform).items()) if not k.startswith("_") and k != "R"}
    return [type(transform).__name__, {k: v for k, v in settings.items() if v is not None}]


# ---------------------------------------------------------------------------------------------- array cache
class ArrayCache:
    """Each case's deterministic chain run once (MONAI), each key stored as ``<folder>/<index>-<key>.npy``.

    The folder name is a fingerprint of the items (paths, sizes, modification times, in-memory arrays), of the
    chain's settings (:func:`chain_signature`) and of ``tag``, so a changed dataset or chain never reuses stale
    arrays. Arrays are
    written atomically; an unreadable cached array is an error naming it.
    """

    def __init__(self, items: Sequence[Mapping], chain: Sequence, keys: Sequence[str], cache_dir: str | os.PathLike,
                 tag: str = "", progress: bool = False):
        self.items, self.chain, self.keys = list(items), list(chain), tuple(keys)
        if not self.items:
            raise DataError("loader", "the training datalist is empty; fix: check the datalist and its paths")
        self.folder = Path(cache_dir) / f"dali-{self._fingerprint(tag)}"
        self.progress = progress
        self.shapes: list[dict[str, tuple]] = []

    def _fingerprint(self, tag: str) -> str:
        def stat(value):
            if isinstance(value, str) and os.path.isfile(value):
                s = os.stat(value)
                return [value, s.st_size, int(s.st_mtime)]
            if hasattr(value, "shape"):  # in-memory arrays: their content
                return hashlib.sha1(np.ascontiguousarray(np.asarray(value)).tobytes()).hexdigest()
            return value

        record = [{k: stat(v) for k, v in sorted(it.items()) if isinstance(v, (str, int, float)) or hasattr(v, "shape")}
                  for it in self.items]
        chain = [chain_signature(t) for t in self.chain]  # a changed chain (scheme, grid, scaling) re-caches
        return hashlib.sha1(json.dumps([record, chain, tag, self.keys], default=str).encode()).hexdigest()[:16]

    def path(self, index: int, key: str) -> Path:
        return self.folder / f"{index:05d}-{key}.npy"

    def build(self) -> "ArrayCache":
        from monai.transforms import Compose
        from tqdm import tqdm

        from common.io import atomic_path

        self.folder.mkdir(parents=True, exist_ok=True)
        chain = Compose(self.chain)
        self.shapes = []
        for index, item in enumerate(tqdm(self.items, desc="DALI array cache", disable=not self.progress)):
            if all(self.path(index, k).exists() for k in self.keys):
                self.shapes.append({k: self._read_header(index, k) for k in self.keys})
                continue
            out = chain(dict(item))
            shapes = {}
            for key in self.keys:
                if key not in out:
                    raise DataError(item.get(key, item.get("id", index)), f"the chain gives no {key!r}")
                array = np.ascontiguousarray(np.asarray(out[key]), dtype=np.float32)
                with atomic_path(self.path(index, key)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, array)
                shapes[key] = array.shape
            self.shapes.append(shapes)
        return self

    def _read_header(self, index: int, key: str) -> tuple:
        return tuple(np.load(self.path(index, key), mmap_mode="r").shape)

    def load(self, index: int, key: str) -> np.ndarray:
        path = self.path(index, key)
        try:
            return np.load(path)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"cached array unreadable ({exc}); fix: delete {self.folder} and rerun") from None

    def __len__(self) -> int:
        return len(self.items)


# ----------------------------------------------------------------------------------------------- pipeline
class DaliAugmenter:
    """One DALI pipeline: per key an input, the planned steps (same parameters for every key of a sample),
    arrays out as torch tensors on ``device``."""

    def __init__(self, keys: Sequence[str], plan: Sequence, batch_size: int, device: Any = "cpu",
                 num_threads: int = 2, seed: int = 0, spatial_dims: int = 3):
        import torch

        require_dali()
        self.keys, self.plan, self.batch_size = tuple(keys), list(plan), int(batch_size)
        self.spatial = "DHW" if spatial_dims == 3 else "HW"
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.pipe = self._build(num_threads, seed)

    def _build(self, num_threads: int, seed: int):
        from nvidia.dali import fn, pipeline_def, types

        device_id = (self.device.index or 0) if self.gpu else None

        @pipeline_def(batch_size=self.batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                      prefetch_queue_depth=1)
        def pipeline():
            data = {k: fn.external_source(name=k, layout="C" + self.spatial) for k in self.keys}
            if self.gpu:
                data = {k: v.gpu() for k, v in data.items()}
            flip_names = {"D": "depthwise", "H": "vertical", "W": "horizontal"}
            for i, step in enumerate(self.plan):
                if isinstance(step, PadCrop):
                    anchor = fn.external_source(name=f"step{i}_anchor", dtype=types.INT32)
                    for k in step.keys:
                        if k in data:
                            data[k] = fn.slice(data[k], anchor, list(step.spatial_size), axis_names=self.spatial,
                                               normalized_anchor=False, normalized_shape=False,
                                               out_of_bounds_policy="pad", fill_values=0)
                elif isinstance(step, Flip):
                    flag = fn.external_source(name=f"step{i}", dtype=types.INT32)
                    kwargs = {flip_names[name]: (flag if a in step.axes else 0) for a, name in enumerate(self.spatial)}
                    for k in step.keys:
                        if k in data:
                            data[k] = fn.flip(data[k], **kwargs)
                else:
                    size = fn.external_source(name=f"step{i}", dtype=types.FLOAT)
                    anchor = fn.external_source(name=f"step{i}_anchor", dtype=types.INT32)
                    for k, mode in zip(step.keys, step.modes):
                        if k not in data:
                            continue
                        interp = types.INTERP_NN if mode in ("nearest", "nearest-exact") else types.INTERP_LINEAR
                        zoomed = fn.resize(data[k], size=size, interp_type=interp, antialias=False)
                        data[k] = fn.slice(zoomed, anchor, list(step.spatial_size), axis_names=self.spatial,
                                           normalized_anchor=False, normalized_shape=False,
                                           out_of_bounds_policy="pad", fill_values=0)
            return tuple(data[k] for k in self.keys)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __call__(self, arrays: Sequence[Mapping[str, np.ndarray]], params: Sequence[Sequence[dict]]) -> dict:
        """A batch of samples (dicts key -> [C, *spatial] float32) and their drawn parameters -> dict of tensors
        [B, C, *spatial]."""
        import torch

        for k in self.keys:
            self.pipe.feed_input(k, [a[k] for a in arrays])
        for i, step in enumerate(self.plan):
            if "anchor" in params[0][i]:
                self.pipe.feed_input(f"step{i}_anchor", [np.array(p[i]["anchor"], dtype=np.int32) for p in params])
            if isinstance(step, Flip):
                self.pipe.feed_input(f"step{i}", [np.array(p[i]["flip"], dtype=np.int32) for p in params])
            elif isinstance(step, ScaleZeroPad):
                self.pipe.feed_input(f"step{i}", [np.array(p[i]["size"], dtype=np.float32) for p in params])
        outputs = self.pipe.run()
        batch = {}
        for k, out in zip(self.keys, outputs):
            if self.gpu:
                from nvidia.dali.plugin.pytorch import feed_ndarray

                dense = out.as_tensor()
                tensor = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
                feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(self.device))
            else:
                tensor = torch.from_numpy(np.array(out.as_tensor()))
            batch[k] = tensor
        return batch
