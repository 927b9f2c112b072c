"""Data loading whose order is a pure function of ``(seed, epoch)``, so a run resumed mid-epoch sees
exactly the batches an uninterrupted run would have seen.

``ResumableSampler`` is a ``DistributedSampler`` (works with one process too). The trainers in this
package call ``sampler.set_epoch(epoch)`` and ``sampler.skip(n)`` at ``EPOCH_STARTED``, where ``n`` is
the number of samples this process already consumed in the current epoch (0 except after a resume).
Use :func:`make_dataloader` to get a MONAI DataLoader wired this way.

Random augmentations are made exact too: with ``seed_per_sample=True`` (default) the sampler yields
``(index, epoch)`` pairs and :class:`SeededDataset` re-seeds the dataset's MONAI random transforms with a
seed derived from ``(seed, epoch, index)`` before each item is loaded -- the same augmentation for a
sample in a given epoch whatever the number of workers or processes, and after any resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

import ignite.distributed as idist

__all__ = ["DaliLoader", "ResumableSampler", "SeededDataset", "make_dataloader", "sample_seed", "training_loader"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 31-bit seed for one sample of one epoch."""
    x = (int(seed) * 0x9E3779B1 + int(epoch) * 0x85EBCA77 + int(index) * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 32
    return int(x % (2**31 - 1))


class SeededDataset(Dataset):
    """Wraps a dataset: item ``(index, epoch)`` re-seeds its random transforms, then loads ``index``."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        from monai.data.utils import set_rnd

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        target = getattr(self.dataset, "transform", None)
        set_rnd(target if target is not None else self.dataset, sample_seed(self.seed, epoch, index))
        return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) sampler partitioned across processes that can skip the start of an epoch."""

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        generator: torch.Generator | None = None,
        with_epoch: bool = False,
    ):
        num_replicas = idist.get_world_size() if num_replicas is None else num_replicas
        rank = idist.get_rank() if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.generator = generator  # the DataLoader's generator: reseeded per epoch for worker seeds
        self.with_epoch = with_epoch  # yield (index, epoch) pairs for SeededDataset
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 100_003 + int(epoch))

    def skip(self, n_samples: int) -> None:
        """Drop the first ``n_samples`` of the next ``__iter__`` only (one-shot)."""
        if n_samples < 0:
            raise ValueError(f"cannot skip a negative number of samples ({n_samples})")
        self._skip = int(n_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        indices = indices[skip:]
        if self.with_epoch:
            return iter([(i, self.epoch) for i in indices])
        return iter(indices)


def make_dataloader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    seed_per_sample: bool = True,
    **kwargs: Any,
):
    """MONAI DataLoader with a :class:`ResumableSampler` (partitioned across processes under torchrun).

    ``batch_size`` is per process. ``kwargs`` go to ``monai.data.DataLoader`` (e.g. ``pin_memory``,
    ``persistent_workers``). ``seed_per_sample``: wrap the dataset in :class:`SeededDataset` so random
    augmentations depend only on ``(seed, epoch, index)``.
    """
    from monai.data import DataLoader

    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("make_dataloader: the dataset is empty (check the datalist and its paths)")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, generator=generator,
                               with_epoch=seed_per_sample)
    return DataLoader(
        SeededDataset(dataset, seed) if seed_per_sample else dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )


class DaliLoader:
    """The training loader served by NVIDIA DALI (``"loader": "dali"``), built from the MONAI loader a bundle
    defines (:func:`make_dataloader` over a ``CacheDataset``): same items, chain, batch size, seed and order.

    The deterministic chain runs once per case into an array cache (``common.data.dali.ArrayCache``); the
    random augmentations run in a DALI pipeline on ``device`` with parameters drawn from
    ``sample_seed(seed, epoch, index)``. ``sampler`` is a :class:`ResumableSampler`, so the trainers position a
    resumed run exactly as with the MONAI loader. Do not fork DataLoader workers in a process once a DALI
    pipeline runs (a forked copy of its threads can deadlock): the bundles' validation loaders use no workers.
    """

    def __init__(self, dataloader, cache_dir: str | None = None, device: Any = "cpu", num_threads: int = 2,
                 tag: str = "", progress: bool = False):
        from common.data.dali import (ArrayCache, DaliAugmenter, SliceSample, augmentation_plan, require_dali,
                                      split_chain)
        from common.io import cache_dir as default_cache_dir

        require_dali()
        dataset = dataloader.dataset
        base = dataset.dataset if isinstance(dataset, SeededDataset) else dataset
        if not hasattr(base, "data") or not hasattr(base, "transform"):
            raise TypeError(f"DaliLoader needs a MONAI dataset with data and transform, got {type(base).__name__}")
        transforms = list(getattr(base.transform, "transforms", base.transform))
        self.keys = self._output_keys(transforms)
        deterministic, random = split_chain(base.transform)
        self.plan = augmentation_plan(random)
        # a slice sampler first (2-D training from volumes): cut on the host, the rest runs on 2-D images
        self.slicer = self.plan[0] if self.plan and isinstance(self.plan[0], SliceSample) else None
        array_keys = self.keys
        if self.slicer is not None:
            array_keys = tuple(k for k in self.keys if k != self.slicer.index_key)
            array_keys += (self.slicer.brain_key,) if self.slicer.brain_key not in array_keys else ()
        self.cache = ArrayCache(base.data, deterministic, array_keys, Path(cache_dir or default_cache_dir()) / "dali",
                                tag=tag, progress=progress)
        self.cache.build()
        self._eligible: dict[int, Any] = {}
        sampler = dataloader.sampler
        self.seed, self.batch_size, self.drop_last = int(sampler.seed), int(dataloader.batch_size), bool(sampler.drop_last)
        self.sampler = ResumableSampler(range(len(self.cache)), shuffle=sampler.shuffle, seed=self.seed,
                                        drop_last=self.drop_last, num_replicas=sampler.num_replicas,
                                        rank=sampler.rank, with_epoch=True)
        per_item = self.slicer.num_samples if self.slicer else 1
        self.image_keys = tuple(k for k in self.keys if not (self.slicer and k == self.slicer.index_key))
        self.pipeline_plan = self.plan[1:] if self.slicer else self.plan  # what DALI runs
        self.augment = DaliAugmenter(self.image_keys, self.pipeline_plan, self.batch_size * per_item, device, num_threads,
                                     self.seed, spatial_dims=2 if self.slicer else 3)

    @staticmethod
    def _output_keys(transforms) -> tuple:
        from monai.transforms import EnsureTyped, ToTensord

        last = transforms[-1] if transforms else None
        if not isinstance(last, (EnsureTyped, ToTensord)):
            raise TypeError("DaliLoader: the training chain must end with EnsureTyped/ToTensord naming the keys "
                            "the trainer reads")
        return tuple(last.keys)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                return
            arrays, params, slices = [], [], []
            for index, epoch in chunk:
                for j, (sample, z) in enumerate(self._samples(index, epoch)):
                    arrays.append(sample)
                    params.append(self._draw(index, epoch, j, {k: v.shape for k, v in sample.items()}))
                    slices.append(z)
            batch = self.augment(arrays, params)
            if self.slicer is not None:
                batch[self.slicer.index_key] = torch.tensor(slices)
            yield batch

    def _samples(self, index: int, epoch: int) -> list:
        """[(arrays entering the pipeline, slice index or None)] of one item: the volume, or its drawn slices."""
        import numpy as np

        from common.io import DataError

        volumes = {k: self.cache.load(index, k) for k in self.cache.keys}
        if self.slicer is None:
            return [({k: volumes[k] for k in self.image_keys}, None)]
        if index not in self._eligible:
            self._eligible[index] = self.slicer.eligible(volumes[self.slicer.brain_key])
        eligible = self._eligible[index]
        if eligible.size == 0:
            case = self.cache.items[index].get("id", index)
            raise DataError(f"case {case}", f"no slice has >= {self.slicer.min_fraction:.0%} brain; "
                                            "fix: check the sources")
        picks = self.slicer.picks(eligible, np.random.default_rng([sample_seed(self.seed, epoch, index), 1]))
        axis = self.slicer.axis + 1
        return [({k: np.ascontiguousarray(volumes[k].take(int(z), axis=axis)) for k in self.image_keys}, int(z))
                for z in picks]

    def _draw(self, index: int, epoch: int, sample: int, shapes) -> list:
        from common.data.dali import draw

        return draw(self.pipeline_plan, [sample_seed(self.seed, epoch, index), 0, sample], shapes)


def training_loader(loader: str, dataloader, cache_dir: str | None = None, device: Any = "cpu", tag: str = ""):
    """The bundle's MONAI ``dataloader`` as it is (``"monai"``) or served by DALI (``"dali"``): one switch."""
    from common.io import check_choice

    check_choice("loader", loader, ("monai", "dali"))
    if loader == "monai":
        return dataloader
    return DaliLoader(dataloader, cache_dir=cache_dir, device=device, tag=tag)
