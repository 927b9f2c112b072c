"""Validation for generative trainers, built on MONAI's ``SupervisedEvaluator`` + ``ValidationHandler``.

* :class:`SeededEvaluator` -- a ``SupervisedEvaluator`` that runs with a fixed seed inside a forked RNG:
  validation samples are comparable across epochs and the training RNG stream (hence exact resume) is
  untouched.
* Prepare-batch helpers: :class:`ReconstructionPrepareBatch` (image -> (image, image)) for autoencoders,
  :class:`ConditionPrepareBatch` (-> (condition, image)) for samplers whose inferer maps a condition
  (e.g. a tumour mask) to images.
* :class:`ReconstructionInferer` -- ``network.reconstruct(x)`` (deterministic, posterior mean) or
  ``network(x)[0]``.
* Metric handlers (ignite metrics for ``key_val_metric`` / ``additional_metrics``) around *pluggable*
  functions ``fn(pred, target) -> per-sample values [B]``: :func:`metric_handler`, and
  :func:`ssim_handler`, :func:`psnr_handler`, :func:`mae_handler` (data range taken per sample from the
  target, which suits z-scored MRI). Per-volume functions of the evaluation suite (``common.metrics``,
  ``fn(pred_3d, target_3d) -> float``) plug in through :func:`per_volume`, e.g.
  ``metric_handler(per_volume(common.metrics.similarity.ssim, data_range=1.0))``. Values are gathered
  over processes.

Bundle config sketch::

    "validate#evaluator": {"_target_": "common.engines.validation.SeededEvaluator", "device": "@device",
        "val_data_loader": "@validate#dataloader", "network": "@autoencoder", "seed": 0,
        "prepare_batch": "$common.engines.validation.ReconstructionPrepareBatch('image')",
        "inferer": "$common.engines.validation.ReconstructionInferer()",
        "key_val_metric": {"val_ssim": "$common.engines.validation.ssim_handler()"},
        "additional_metrics": {"val_psnr": "$common.engines.validation.psnr_handler()",
                               "val_mae": "$common.engines.validation.mae_handler()"}},
    "train#handlers": [{"_target_": "ValidationHandler", "validator": "@validate#evaluator",
                        "epoch_level": true, "interval": "@val_interval"}, ...]
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, from_engine
from monai.inferers import Inferer
from monai.metrics.regression import RegressionMetric

from common.engines.autoencoder import ssim_similarity

__all__ = [
    "SeededEvaluator",
    "ReconstructionPrepareBatch",
    "ConditionPrepareBatch",
    "ReconstructionInferer",
    "FunctionMetric",
    "metric_handler",
    "per_volume",
    "ssim_per_sample",
    "psnr_per_sample",
    "mae_per_sample",
    "ssim_handler",
    "psnr_handler",
    "mae_handler",
]


class SeededEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` with ``seed``: each run starts from the same RNG state and leaves the caller's
    python/numpy/torch(/CUDA) generators exactly as they were. Other args as ``SupervisedEvaluator``."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seed = int(seed)

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        py_state, np_state = random.getstate(), np.random.get_state()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed)
                random.seed(self.seed)
                np.random.seed(self.seed)
                super().run(global_epoch)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ReconstructionPrepareBatch:
    """``prepare_batch`` for autoencoder validation: the image is both input and target."""

    def __init__(self, image_key: str = "image"):
        self.image_key = image_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        if self.image_key not in batchdata:
            raise KeyError(f"validation batch has no '{self.image_key}' key (got {list(batchdata)})")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return image, image


class ConditionPrepareBatch:
    """``prepare_batch`` for conditional samplers: returns ``(condition, image)``; the inferer maps the
    condition to generated images, metrics compare them with the real image."""

    def __init__(self, condition_key: str = "label", image_key: str = "image"):
        self.condition_key = condition_key
        self.image_key = image_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        for key in (self.condition_key, self.image_key):
            if key not in batchdata:
                raise KeyError(f"validation batch has no '{key}' key (got {list(batchdata)})")
        cond = batchdata[self.condition_key].to(device=device, non_blocking=non_blocking, **kwargs)
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return cond, image


class ReconstructionInferer(Inferer):
    """Autoencoder reconstruction for validation (deterministic when the network has ``reconstruct``)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hasattr(network, "reconstruct"):
            return network.reconstruct(inputs)
        out = network(inputs, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class FunctionMetric(RegressionMetric):
    """MONAI cumulative metric around ``fn(pred, target) -> per-sample values [B]`` (mean over samples)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], reduction: str = "mean"):
        super().__init__(reduction=reduction)
        self.fn = fn

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = torch.as_tensor(self.fn(y_pred, y))
        return values.reshape(y_pred.shape[0], -1).float()


def _range(target: torch.Tensor) -> torch.Tensor:
    flat = target.detach().flatten(1).float()
    return (flat.max(1).values - flat.min(1).values).clamp_min(1e-6)


def ssim_per_sample(pred: torch.Tensor, target: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """SSIM per sample: the training loss's SSIM with each target's own range (z-scored MRI has no fixed range)."""
    with torch.no_grad():
        return torch.stack([ssim_similarity(p[None], t[None], kernel_size) for p, t in zip(pred, target)])


def psnr_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR per sample (dB) with the target's range as peak value."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(_range(target).pow(2) / mse)


def mae_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).abs().flatten(1).mean(1)


def per_volume(fn: Callable[..., float], **kwargs: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Batch metric from a per-volume one: ``fn(pred[i, c], target[i, c], **kwargs)`` on numpy volumes,
    averaged over channels -> values ``[B]``."""

    def batch_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = pred.detach().float().cpu().numpy()
        t = target.detach().float().cpu().numpy()
        values = [
            sum(float(fn(p[i, c], t[i, c], **kwargs)) for c in range(p.shape[1])) / p.shape[1]
            for i in range(p.shape[0])
        ]
        return torch.tensor(values, dtype=torch.float64)

    return batch_fn


def metric_handler(fn: Callable | Any, output_transform: Callable | None = None, save_details: bool = False):
    """Ignite metric (MONAI ``IgniteMetricHandler``) from a MONAI cumulative metric or a per-sample function."""
    from monai.metrics import CumulativeIterationMetric

    metric = fn if isinstance(fn, CumulativeIterationMetric) else FunctionMetric(fn)
    return IgniteMetricHandler(
        metric_fn=metric,
        output_transform=output_transform or from_engine(["pred", "label"]),
        save_details=save_details,
    )


def ssim_handler(kernel_size: int = 7, output_transform: Callable | None = None):
    return metric_handler(lambda p, t: ssim_per_sample(p, t, kernel_size), output_transform)


def psnr_handler(output_transform: Callable | None = None):
    return metric_handler(psnr_per_sample, output_transform)


def mae_handler(output_transform: Callable | None = None):
    return metric_handler(mae_per_sample, output_transform)
