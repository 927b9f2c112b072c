"""Training feedback on rank 0: a tqdm progress bar (ignite ``ProgressBar``) and TensorBoard scalars
(every float in the engine output) plus middle axial/coronal/sagittal slices of image outputs.

Use :func:`attach_logging` in Python or :class:`TrainingLogger` in a bundle's ``train#handlers``::

    {"_target_": "common.engines.monitor.TrainingLogger", "log_dir": "$@bundle_root + '/eval'",
     "image_keys": ["image", "reconstruction"], "image_interval": 200}
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.engines.distributed import is_main_process

__all__ = ["TrainingLogger", "attach_logging", "slice_grid"]


def _as_dict(output) -> dict:
    if hasattr(output, "as_dict"):
        return output.as_dict()
    return output if isinstance(output, dict) else {}


def _has(output, key: str) -> bool:
    return (hasattr(output, "as_dict") or isinstance(output, dict)) and key in output


def slice_grid(volume: torch.Tensor) -> np.ndarray:
    """One channel-first sample ([C, H, W, D] or [C, H, W]) -> [1, H', W'] image of channel 0: the three
    middle slices side by side for 3D, the image itself for 2D; min-max scaled to [0, 1]."""
    v = torch.as_tensor(volume).detach().float().cpu()[0]
    if v.ndim == 2:
        planes = [v]
    else:
        h, w, d = v.shape
        planes = [v[:, :, d // 2], v[:, w // 2, :], v[h // 2, :, :]]
    height = max(p.shape[0] for p in planes)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, height - p.shape[0])) for p in planes]
    grid = torch.cat(padded, dim=1).numpy()
    lo, hi = float(grid.min()), float(grid.max())
    grid = (grid - lo) / (hi - lo) if hi > lo else np.zeros_like(grid)
    return grid[None]


class TrainingLogger:
    """Progress bar + TensorBoard for a trainer (only on rank 0; a no-op elsewhere).

    Args:
        log_dir: TensorBoard folder (None: progress bar only).
        scalar_interval: log float outputs every N iterations.
        image_keys: output keys holding image batches to show as slices.
        image_interval: log image slices every N iterations.
        progress: show a tqdm progress bar with the running loss.
        tag_prefix: prefix of the TensorBoard tags.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        scalar_interval: int = 1,
        image_keys: Sequence[str] = (),
        image_interval: int = 100,
        progress: bool = True,
        tag_prefix: str = "train",
    ):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.scalar_interval = max(1, int(scalar_interval))
        self.image_keys = tuple(image_keys)
        self.image_interval = max(1, int(image_interval))
        self.progress = progress
        self.tag_prefix = tag_prefix
        self.writer = None

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        if self.progress:
            from ignite.handlers import ProgressBar

            ProgressBar(persist=True).attach(
                engine, output_transform=lambda out: {"loss": out["loss"]} if _has(out, "loss") else {}
            )
        if self.log_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.scalar_interval), self._scalars)
        if self.image_keys:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.image_interval), self._images)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.writer.flush())

    def _scalars(self, engine: Engine) -> None:
        out = _as_dict(engine.state.output)
        step = engine.state.iteration
        for key, value in out.items():
            if isinstance(value, (float, int)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.tag_prefix}/{key}", float(value), step)
        optimizer = getattr(engine, "optimizer", None)
        for i, group in enumerate(optimizer.param_groups if optimizer is not None else []):
            self.writer.add_scalar(f"{self.tag_prefix}/lr{i}", float(group["lr"]), step)

    def _images(self, engine: Engine) -> None:
        out = _as_dict(engine.state.output)
        for key in self.image_keys:
            value = out.get(key)
            if isinstance(value, torch.Tensor) and value.ndim >= 3:
                self.writer.add_image(f"{self.tag_prefix}/{key}", slice_grid(value[0]), engine.state.iteration)

    def _epoch(self, engine: Engine) -> None:
        for name, value in engine.state.metrics.items():
            if isinstance(value, (float, int)):
                self.writer.add_scalar(f"{self.tag_prefix}/{name}", float(value), engine.state.iteration)
        self.writer.flush()


def attach_logging(engine: Engine, log_dir: str | Path | None = None, **kwargs) -> TrainingLogger:
    """Attach a :class:`TrainingLogger` to ``engine`` and return it."""
    logger = TrainingLogger(log_dir, **kwargs)
    logger.attach(engine)
    return logger
