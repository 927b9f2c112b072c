"""Multi-process training through ``ignite.distributed`` (idist).

One code path for 1 process, N GPUs on one node and N nodes: under ``torchrun`` the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) is read and the process group is
initialised with NCCL on GPU and Gloo on CPU; without it every helper is a no-op.

Used by the bundles' ``multi_gpu_train*.json`` overlays, e.g.::

    "device": "$common.engines.distributed.setup()",
    "network": "$common.engines.distributed.wrap_model(@network_def.to(@device))",
    "train#dataloader": {"_target_": "common.engines.make_dataloader", "dataset": "@train#dataset",
                         "batch_size": 1, "shuffle": true, "seed": 0},
    "log_on_this_rank": "$common.engines.distributed.is_main_process(@device)",   # handlers: "_disabled_": "$not @log_on_this_rank"
    "finalize": ["$common.engines.distributed.finalize()"]

``batch_size`` stays per process (the global batch is ``batch_size * world_size``).
"""

from __future__ import annotations

import os
import random
from typing import Any, Iterable

import numpy as np
import torch
import ignite.distributed as idist

__all__ = [
    "setup",
    "finalize",
    "is_main_process",
    "wrap_model",
    "unwrap",
    "all_reduce_mean",
    "all_gather_object",
    "seed_everything",
]


def setup(backend: str | None = None, seed: int | None = None) -> torch.device:
    """Initialise the process group from torchrun's environment (idempotent) and return this process' device.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. With one process nothing is
    initialised. ``seed`` (optional) seeds python/numpy/torch with ``seed + rank`` so that ranks draw different
    noise; the networks stay identical because DDP broadcasts rank 0's weights when wrapping.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and idist.get_world_size() == 1 and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        idist.initialize(backend)
    if torch.cuda.is_available():
        local_rank = idist.get_local_rank() if idist.get_world_size() > 1 else 0
        torch.cuda.set_device(local_rank)
    if seed is not None:
        seed_everything(seed)
    return idist.device()


def finalize() -> None:
    """Destroy the process group (if any) at the end of a run."""
    if idist.get_world_size() > 1 or torch.distributed.is_initialized():
        idist.finalize()


def is_main_process(*after: Any) -> bool:
    """Rank 0 (or the only process). Configs pass ``@device`` as ``after`` so the process group, which
    ``setup()`` creates when ``device`` is resolved, exists before the rank is read."""
    return idist.get_rank() == 0


def seed_everything(seed: int) -> int:
    """Seed python, numpy and torch with ``seed + rank``; returns the seed used by this process."""
    s = int(seed) + idist.get_rank()
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def wrap_model(
    model: torch.nn.Module, find_unused_parameters: bool = False, sync_batchnorm: bool = False, **kwargs: Any
) -> torch.nn.Module:
    """DistributedDataParallel when several processes run, the model itself otherwise.

    Unlike ``idist.auto_model`` this never falls back to ``DataParallel`` on a single process with many GPUs
    (use torchrun instead). Frozen parameters (``requires_grad=False``) are ignored by DDP. Set
    ``find_unused_parameters`` when some trainable parameters do not get a gradient every iteration.
    BatchNorm running statistics stay per process (rank 0's are saved) unless ``sync_batchnorm``.
    """
    if idist.get_world_size() <= 1:
        return model
    model = model.to(idist.device())
    if not any(p.requires_grad for p in model.parameters()):
        return model  # nothing to synchronise (e.g. a frozen autoencoder)
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [idist.get_local_rank()] if idist.device().type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **kwargs
    )


def unwrap(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The plain module inside DDP/DataParallel (state dicts and buffers live there)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity on one process)."""
    if idist.get_world_size() <= 1:
        return values
    return idist.all_reduce(values.clone()) / idist.get_world_size()


def all_gather_object(obj: Any) -> list:
    """List of ``obj`` from every rank (``[obj]`` on one process); any picklable object, where
    ``idist.all_gather`` takes tensors, numbers and strings only."""
    if idist.get_world_size() <= 1:
        return [obj]
    out: list = [None] * idist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
