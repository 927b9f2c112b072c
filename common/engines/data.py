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

from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

import ignite.distributed as idist

__all__ = ["ResumableSampler", "SeededDataset", "make_dataloader", "sample_seed"]


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
