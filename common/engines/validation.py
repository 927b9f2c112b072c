"""Validation for generative trainers, built on MONAI's ``SupervisedEvaluator`` + ``ValidationHandler``.

* :class:`SeededEvaluator` -- a ``SupervisedEvaluator`` that runs with a fixed seed inside a forked RNG:
  validation samples are comparable across epochs and the training RNG stream (hence exact resume) is
  untouched.
* Prepare-batch helpers: :class:`ReconstructionPrepareBatch` (image -> (image, image)) for autoencoders,
  :class:`ConditionPrepareBatch` (-> (inputs, target, (), {"condition": condition})) for conditional models.
* Inferers: :class:`ReconstructionInferer` (``network.reconstruct(x)``, the posterior mean of a KL autoencoder,
  or ``network(x)[0]``); :class:`DenoisingLossInferer` (the diffusion loss at fixed timesteps and fixed noise,
  pixel or latent space).
* Metric handlers (ignite metrics for ``key_val_metric`` / ``additional_metrics``) around *pluggable*
  functions ``fn(pred, target) -> per-sample values [B]``: :func:`metric_handler`, :func:`ssim_handler` and
  :func:`psnr_handler` (data range taken per sample from the target: z-scored MRI has no fixed range, which
  MONAI's ``PSNRMetric(max_val)`` assumes); MAE is MONAI's ``MeanAbsoluteError`` handler. Values are gathered
  over processes.

Bundle config sketch::

    "validate#evaluator": {"_target_": "common.engines.validation.SeededEvaluator", "device": "@device",
        "val_data_loader": "@validate#dataloader", "network": "@autoencoder", "seed": 0,
        "prepare_batch": "$common.engines.validation.ReconstructionPrepareBatch('image')",
        "inferer": "$common.engines.validation.ReconstructionInferer()",
        "key_val_metric": {"val_ssim": "$common.engines.validation.ssim_handler()"},
        "additional_metrics": {"val_psnr": "$common.engines.validation.psnr_handler()",
                               "val_mae": {"_target_": "MeanAbsoluteError",
                                           "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}}},
    "train#handlers": [{"_target_": "ValidationHandler", "validator": "@validate#evaluator",
                        "epoch_level": true, "interval": "@val_interval"}, ...]
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.engines import SupervisedEvaluator
from monai.handlers import IgniteMetricHandler, from_engine
from monai.inferers import Inferer
from monai.metrics.regression import RegressionMetric


__all__ = [
    "SeededEvaluator",
    "ReconstructionPrepareBatch",
    "ConditionPrepareBatch",
    "ReconstructionInferer",
    "DenoisingLossInferer",
    "FunctionMetric",
    "metric_handler",
    "ssim_per_sample",
    "psnr_per_sample",
    "ssim_handler",
    "psnr_handler",
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
    """``prepare_batch`` for conditional models: ``(inputs, target, (), {"condition": condition})``, so MONAI's
    ``SupervisedEvaluator`` calls ``inferer(inputs, network, condition=condition)``.

    ``input_key=None`` gives the condition as the inferer's input (a sampler mapping a mask to images) and no
    keyword; ``target_key=None`` gives zeros [B, 1] as the target (a loss-valued inferer scored against 0)."""

    def __init__(self, condition_key: str = "label", input_key: str | None = "image", target_key: str | None = None):
        self.condition_key, self.input_key, self.target_key = condition_key, input_key, target_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
        def get(key):
            if key not in batchdata:
                raise KeyError(f"validation batch has no '{key}' key (got {list(batchdata)})")
            return batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)

        cond = get(self.condition_key)
        if self.input_key is None:
            target = get(self.target_key) if self.target_key else torch.zeros(cond.shape[0], 1, device=device)
            return cond, target
        inputs = get(self.input_key)
        target = get(self.target_key) if self.target_key else torch.zeros(inputs.shape[0], 1, device=device)
        return inputs, target, (), {"condition": cond}


class ReconstructionInferer(Inferer):
    """Autoencoder reconstruction for validation (deterministic when the network has ``reconstruct``, as MONAI's
    ``AutoencoderKL`` does: decoder of the posterior mean)."""

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        from common.engines.distributed import unwrap

        plain = unwrap(network)
        if hasattr(plain, "reconstruct"):
            return plain.reconstruct(inputs)
        out = network(inputs, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class DenoisingLossInferer:
    """``inferer(images, network, condition=...)`` -> per-case mean squared error of the diffusion target
    ([B, 1]) averaged over ``timesteps`` (evenly spread unless given), with fixed noise: the number moves only
    when the model does. Latent models are scored on their deterministic latents (``network.encode_mean``).

    Score it with MONAI's ``MeanAbsoluteError`` against the zero target of :class:`ConditionPrepareBatch`:
    the MAE of a non-negative error against 0 is the error itself.
    """

    def __init__(self, scheduler, num_timesteps: int = 8, timesteps: Sequence[int] | None = None, seed: int = 0):
        self.scheduler = scheduler
        total = scheduler.num_train_timesteps
        if timesteps is None:
            timesteps = [int(round((i + 0.5) * total / num_timesteps)) for i in range(num_timesteps)]
        self.timesteps = [min(max(int(t), 0), total - 1) for t in timesteps]
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, network, condition: torch.Tensor | None = None) -> torch.Tensor:
        from common.engines.diffusion import diffusion_target
        from common.engines.distributed import unwrap

        net = unwrap(network)
        x0 = net.encode_mean(images) if hasattr(net, "encode_mean") else images
        gen = torch.Generator(device=x0.device).manual_seed(self.seed)
        errors = []
        for t in self.timesteps:
            noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            ts = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            noisy = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=ts)
            pred = net(noisy, ts, condition=condition)
            target = diffusion_target(self.scheduler, x0, noise, ts)
            errors.append(((pred.float() - target.float()) ** 2).flatten(1).mean(1))
        return torch.stack(errors, 1).mean(1, keepdim=True)


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


def ssim_per_sample(pred: torch.Tensor, target: torch.Tensor, kernel_size: int = 11) -> torch.Tensor:
    """SSIM per sample (common.ops.ssim) with each target's own data range (z-scored MRI has no fixed range);
    the window shrinks (odd) on volumes smaller than it."""
    from common.ops.ssim import ssim

    k = min(kernel_size, min(pred.shape[2:]))
    k = k if k % 2 == 1 else k - 1
    with torch.no_grad():
        return torch.stack([ssim(p[None].float(), t[None].float(), data_range=r, kernel_size=k)
                            for p, t, r in zip(pred, target, _range(target))])


def psnr_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR per sample (dB) with the target's range as peak value."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10.0 * torch.log10(_range(target).pow(2) / mse)


def metric_handler(fn: Callable | Any, output_transform: Callable | None = None, save_details: bool = False):
    """Ignite metric (MONAI ``IgniteMetricHandler``) from a MONAI cumulative metric or a per-sample function."""
    from monai.metrics import CumulativeIterationMetric

    metric = fn if isinstance(fn, CumulativeIterationMetric) else FunctionMetric(fn)
    return IgniteMetricHandler(
        metric_fn=metric,
        output_transform=output_transform or from_engine(["pred", "label"]),
        save_details=save_details,
    )


def ssim_handler(kernel_size: int = 11, output_transform: Callable | None = None):
    return metric_handler(lambda p, t: ssim_per_sample(p, t, kernel_size), output_transform)


def psnr_handler(output_transform: Callable | None = None):
    return metric_handler(psnr_per_sample, output_transform)


class ValidationImages:
    """TensorBoard picture of the first validation case: real (``label``) above generated (``pred``), the
    middle axial slice of every channel side by side, each channel scaled to its own real range. Attach to an
    evaluator whose outputs pair a target image with a generated one (reconstruction, imputation); the
    diffusion stages' outputs are noise and do not attach it."""

    def __init__(self, log_dir: str, tag: str = "validation/real_vs_generated"):
        self.log_dir = log_dir
        self.tag = tag
        self._writer = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    @staticmethod
    def _middle_slices(volume: torch.Tensor) -> torch.Tensor:
        volume = volume.detach().float().cpu()
        return volume[..., volume.shape[-1] // 2] if volume.ndim == 4 else volume  # [C, H, W]

    def picture(self, output) -> torch.Tensor:
        """[1, 2H, C*W] in [0, 1] from one output dict (or a batch dict: its first case)."""
        if isinstance(output, (list, tuple)):  # decollated: one dict per case
            real, generated = output[0]["label"], output[0]["pred"]
        else:  # one dict of batched tensors
            real, generated = output["label"][0], output["pred"][0]
        real, generated = self._middle_slices(real), self._middle_slices(generated)
        low = real.flatten(1).amin(1).view(-1, 1, 1)
        high = real.flatten(1).amax(1).view(-1, 1, 1)
        scale = lambda x: ((x - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)  # noqa: E731
        rows = [torch.cat(list(scale(img)), dim=-1) for img in (real, generated)]
        return torch.cat(rows, dim=0)[None]

    def __call__(self, engine) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        self._writer.add_image(self.tag, self.picture(engine.state.output), engine.state.epoch, dataformats="CHW")
        self._writer.flush()
