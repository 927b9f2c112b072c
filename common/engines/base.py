"""Shared machinery of the generative trainers: AMP (bf16/fp16), gradient clipping, EMA, resumable
data order, loss reduction across processes and the list of objects a full checkpoint must hold.

Subclasses implement ``_train_step(batch) -> dict`` returning a float ``loss`` plus other floats and
batch tensors. The engine output is an :class:`EngineOutput`: MONAI's decollated list of per-sample
dicts (so ``from_engine(["loss"], first=True)`` -- used by ``--tracking mlflow`` and ``StatsHandler`` --
and ``from_engine(["pred", "label"])`` metric transforms work) that also answers ``output["loss"]`` /
``output["image"]`` with the batch-level values.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from ignite.engine import Events
from ignite.handlers import EMAHandler
from monai.engines import Trainer
from monai.engines.utils import default_metric_cmp_fn, default_prepare_batch
from monai.engines.workflow import Workflow

import ignite.distributed as idist

from common.engines.distributed import all_reduce_mean, unwrap

__all__ = ["GenerativeTrainer", "EngineOutput", "AMP_DTYPES"]

AMP_DTYPES = {None: None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


class EngineOutput(list):
    """Per-sample dicts (MONAI's decollated output) plus batch-level access by key.

    ``out[0]`` is the first sample's dict (floats replicated, tensors split along the batch);
    ``out["loss"]``, ``out.get``, ``keys()``, ``items()``, ``"loss" in out`` use the batch-level dict.
    """

    def __init__(self, batch_output: dict):
        self.batch = dict(batch_output)
        n = _batch_size(self.batch)
        samples = [
            {k: (v[i] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
             for k, v in self.batch.items()}
            for i in range(n)
        ]
        super().__init__(samples)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return self.batch[key]
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:  # type: ignore[override]
        return key in self.batch if isinstance(key, str) else super().__contains__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.batch.get(key, default)

    def keys(self):
        return self.batch.keys()

    def items(self):
        return self.batch.items()

    def values(self):
        return self.batch.values()

    def as_dict(self) -> dict:
        return dict(self.batch)


def _batch_size(output: dict) -> int:
    for key in ("image", "pred"):
        v = output.get(key)
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


class GenerativeTrainer(Trainer):
    """Base class (a MONAI ``Trainer``, hence an ignite ``Engine``) for the generative trainers.

    Args:
        amp: ``"bf16"``, ``"fp16"`` or ``None``. fp16 uses a ``torch.amp.GradScaler``; bf16 needs none.
            Autocast runs on the trainer's device type (works on CPU too).
        grad_clip_norm: clip the global gradient norm of each optimizer's parameters to this value
            (after unscaling); the pre-clip norm is reported as ``grad_norm``.
        ema_decay: keep an exponential moving average of ``ema_network`` (``ema = d*ema + (1-d)*w``
            after every optimizer step) via ``ignite.handlers.EMAHandler``; ``self.ema_model``.
        train_handlers: handlers with ``attach(engine)``; attached after the trainer is fully built,
            so they may reference ``trainer.ema_model`` or use :meth:`checkpoint_objects`.
        other args: as in ``monai.engines.SupervisedTrainer`` (``epoch_length``, ``key_train_metric``,
            ``additional_metrics``, ``metric_cmp_fn``, ``event_names``, ``non_blocking``...).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        ema_network: torch.nn.Module | None = None,
        amp: str | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        optim_set_to_none: bool = True,
        to_kwargs: dict | None = None,
    ):
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of 'bf16', 'fp16' or None, got {amp!r}")
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive, got {grad_clip_norm}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        Workflow.__init__(
            self,
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=default_prepare_batch,  # unused: batches are dicts read by key
            iteration_update=iteration_update,
            postprocessing=None,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,  # attached at the end of the subclass' __init__ (see _finish_init)
            amp=False,  # MONAI's flag means CUDA fp16 only; this class handles AMP itself
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,  # the output is decollated by EngineOutput
            to_kwargs=to_kwargs,
        )
        self.amp_mode = None if amp in (None, "none") else amp
        self.amp_dtype = AMP_DTYPES[amp]
        self.grad_clip_norm = grad_clip_norm
        self.optim_set_to_none = optim_set_to_none
        self.ema_decay = ema_decay
        self.ema_handler: EMAHandler | None = None
        self.ema_model: torch.nn.Module | None = None
        if ema_decay is not None:
            if ema_network is None:
                raise ValueError("ema_decay is set but there is no network to average")
            self.ema_handler = EMAHandler(ema_network, momentum=1.0 - ema_decay, handle_buffers="copy")
            self.ema_model = self.ema_handler.ema_model
        self._pending_handlers = train_handlers
        self.add_event_handler(Events.EPOCH_STARTED, self._position_sampler)
        sampler = getattr(train_data_loader, "sampler", None)
        if hasattr(sampler, "skip") and epoch_length is not None and epoch_length != len(train_data_loader):
            warnings.warn(
                f"epoch_length={epoch_length} differs from the loader length {len(train_data_loader)}: "
                "a resume will not land at the exact same data position"
            )

    # -- construction helpers -------------------------------------------------------------------------
    def _make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.state.device.type, enabled=self.amp_dtype == torch.float16)

    def _finish_init(self) -> None:
        """Attach EMA then user handlers once the subclass has set its networks/optimizers."""
        if self.ema_handler is not None:
            self.ema_handler.attach(self, name="ema_momentum", event=Events.ITERATION_COMPLETED, warn_if_exists=False)
        if self._pending_handlers is not None:
            self._register_handlers(self._pending_handlers)
        self._pending_handlers = None

    def run(self) -> None:  # type: ignore[override]
        # skip monai Trainer.run: it replaces self.scaler with a CUDA GradScaler
        Workflow.run(self)

    # -- per-iteration helpers ------------------------------------------------------------------------
    def _iteration(self, engine: "GenerativeTrainer", batchdata: Any) -> EngineOutput:
        if batchdata is None:
            raise ValueError(f"{type(self).__name__}: empty batch at iteration {self.state.iteration}")
        return EngineOutput(self._train_step(batchdata))

    def _train_step(self, batchdata: Any) -> dict:
        raise NotImplementedError

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.state.device.type, dtype=self.amp_dtype)

    def backward_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> float | None:
        """Backward, optional unscale + clip, optimizer step. Returns the pre-clip gradient norm (if clipping)."""
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss ({float(loss.detach())}) at iteration {self.state.iteration}; "
                "lower the learning rate, enable gradient clipping or use bf16 instead of fp16"
            )
        scaler.scale(loss).backward()
        norm = None
        if self.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm))
        scaler.step(optimizer)
        scaler.update()
        return norm

    def reduce_scalars(self, scalars: dict[str, float]) -> dict[str, float]:
        """Average float outputs over processes so rank 0 logs the global values."""
        if idist.get_world_size() <= 1 or not scalars:
            return scalars
        keys = sorted(scalars)
        vec = torch.tensor([float(scalars[k]) for k in keys], dtype=torch.float64, device=self.state.device)
        vec = all_reduce_mean(vec)
        return {k: float(v) for k, v in zip(keys, vec.tolist())}

    def _position_sampler(self, engine) -> None:
        """Tell a resumable sampler which epoch runs and how much of it was already consumed."""
        sampler = getattr(self.data_loader, "sampler", None)
        if not (hasattr(sampler, "skip") and hasattr(sampler, "set_epoch")):
            return
        sampler.set_epoch(self.state.epoch)
        length = self.state.epoch_length
        if length:
            done = self.state.iteration % length
            batch_size = getattr(self.data_loader, "batch_size", None) or 1
            sampler.skip(done * batch_size)

    # -- checkpointing --------------------------------------------------------------------------------
    def checkpoint_objects(self) -> dict[str, Any]:
        """Objects with ``state_dict``/``load_state_dict`` that define the training state (networks unwrapped)."""
        objects: dict[str, Any] = {}
        for name, obj in self._named_state().items():
            if obj is not None:
                objects[name] = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
        if self.ema_model is not None:
            objects["ema"] = self.ema_model
        return objects

    def _named_state(self) -> dict[str, Any]:
        raise NotImplementedError
