"""Diffusion / rectified-flow training in pixel or latent space, with optional conditioning.

Each iteration: (latent diffusion) encode images with the frozen autoencoder and multiply by the
network's ``scale_factor``; draw noise and timesteps; ``noisy = scheduler.add_noise(x0, noise, t)``;
predict and regress the target given by the scheduler:

* ``DDPMScheduler``/``DDIMScheduler`` with ``prediction_type`` ``"epsilon"`` -> noise,
  ``"v_prediction"`` -> ``scheduler.get_velocity(x0, noise, t)`` (= sqrt(a)*noise - sqrt(1-a)*x0),
  ``"sample"`` -> x0;
* ``RFlowScheduler`` -> velocity ``x0 - noise`` (its ``add_noise`` is ``(1-s)*x0 + s*noise`` with
  ``s = t/T`` and its ``step`` moves along ``+v`` towards the data); timesteps from
  ``scheduler.sample_timesteps``.

Network call: ``network(noisy, timesteps)`` without a condition, ``network(noisy, timesteps,
condition=cond)`` with one (``condition_arg`` renames the keyword, e.g. ``"context"`` for a bare MONAI
``DiffusionModelUNet``), plus ``drop_condition=<bool tensor [B]>`` when ``condition_dropout > 0`` (the
network swaps in its learned null condition, for classifier-free guidance).

Latent scale factor: with an autoencoder the network must carry a buffer ``scale_factor`` (registered
here if missing). If it is <= 0 or NaN when training starts, the first batch sets it to ``1/std(z)``
(pooled over all processes); it then lives in the network's state dict and checkpoints.

Output keys: ``loss`` (float), ``grad_norm`` (with clipping), ``image``, ``pred``, ``target``,
``timesteps`` (detached tensors).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler

import ignite.distributed as idist

from common.engines.base import GenerativeTrainer
from common.engines.distributed import unwrap

__all__ = ["DiffusionTrainer", "diffusion_target", "sample_timesteps", "pooled_std"]


def sample_timesteps(scheduler: Any, x: torch.Tensor) -> torch.Tensor:
    """Training timesteps for a batch: the scheduler's own sampler for RFlow, uniform integers otherwise."""
    if isinstance(scheduler, RFlowScheduler):
        return scheduler.sample_timesteps(x)
    return torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), device=x.device, dtype=torch.long)


def diffusion_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target the network must predict for this scheduler (see module docstring)."""
    if isinstance(scheduler, RFlowScheduler):
        return x0 - noise
    kind = str(getattr(scheduler, "prediction_type", "epsilon"))
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction or sample)")


def pooled_std(z: torch.Tensor) -> float:
    """Standard deviation of all elements of ``z`` pooled over every process."""
    z = z.detach().double()
    stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device)])
    if idist.get_world_size() > 1:
        stats = idist.all_reduce(stats)
    total, total_sq, n = stats.tolist()
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return math.sqrt(var)


class DiffusionTrainer(GenerativeTrainer):
    """Noise / velocity regression trainer (see the module docstring).

    Args:
        network: denoiser (wrap with DDP for multi-GPU); holds ``scale_factor`` for latent diffusion.
        optimizer: its optimizer.
        scheduler: MONAI ``DDPMScheduler``, ``DDIMScheduler`` or ``RFlowScheduler`` (training noise schedule).
        autoencoder: frozen first stage for latent diffusion (``encode_stage_2_inputs``), or None.
        image_key, condition_key: batch keys of the images and of the condition (e.g. ``"label"``).
        condition_dropout: probability of replacing the condition by the null condition per sample.
        condition_arg: keyword under which the condition is passed to the network.
        loss: ``"mse"`` or ``"l1"``.
        ema_decay: EMA of the network weights (``trainer.ema_model``).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        autoencoder: torch.nn.Module | None = None,
        image_key: str = "image",
        condition_key: str | None = None,
        condition_dropout: float = 0.0,
        condition_arg: str = "condition",
        loss: str = "mse",
        amp: str | None = None,
        grad_clip_norm: float | None = None,
        ema_decay: float | None = None,
        **kwargs: Any,
    ):
        if loss not in ("mse", "l1"):
            raise ValueError(f"DiffusionTrainer: loss must be 'mse' or 'l1', got {loss!r}")
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}")
        if condition_dropout > 0 and condition_key is None:
            raise ValueError("condition_dropout > 0 needs a condition_key")
        if not hasattr(scheduler, "add_noise"):
            raise TypeError(f"scheduler must be a MONAI noise scheduler, got {type(scheduler).__name__}")
        if autoencoder is not None:
            autoencoder.requires_grad_(False)
            plain = unwrap(network)
            if not hasattr(plain, "scale_factor"):  # before the EMA copy is made
                param = next(plain.parameters(), None)
                buf_device = param.device if param is not None else None
                plain.register_buffer("scale_factor", torch.tensor(float("nan"), device=buf_device))
        super().__init__(device, max_epochs, train_data_loader, ema_network=network, amp=amp,
                         grad_clip_norm=grad_clip_norm, ema_decay=ema_decay, **kwargs)
        self.network = network
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.autoencoder = autoencoder
        self.image_key = image_key
        self.condition_key = condition_key
        self.condition_dropout = float(condition_dropout)
        self.condition_arg = condition_arg
        self.loss_fn = F.mse_loss if loss == "mse" else F.l1_loss
        self.scaler = self._make_scaler()
        self._finish_init()

    def _named_state(self) -> dict[str, Any]:
        # the frozen autoencoder is stored too: the latents (hence the run) depend on it
        return {"network": self.network, "optimizer": self.optimizer, "scaler": self.scaler,
                "autoencoder": self.autoencoder}

    @property
    def scale_factor(self) -> torch.Tensor | None:
        return getattr(unwrap(self.network), "scale_factor", None)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> scaled latents (sets the scale factor from this batch if it is not set yet)."""
        self.autoencoder.eval()
        with self.autocast():
            z = unwrap(self.autoencoder).encode_stage_2_inputs(images)
        z = z.float()
        buf = self.scale_factor
        if not bool(torch.isfinite(buf).all()) or float(buf) <= 0:
            std = pooled_std(z)
            if std <= 0:
                raise ValueError("DiffusionTrainer: latents of the first batch are constant; cannot set scale_factor")
            buf.fill_(1.0 / std)
            self.logger.info(f"latent scale_factor set to {1.0 / std:.6g} (1/std of the first batch)")
        return z * buf.to(z.device)

    def _train_step(self, batchdata: dict) -> dict:
        if not isinstance(batchdata, dict) or self.image_key not in batchdata:
            keys = list(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
            raise KeyError(f"DiffusionTrainer: batch has no '{self.image_key}' key (got {keys})")
        device = self.state.device
        images = torch.as_tensor(batchdata[self.image_key].to(device, non_blocking=self.non_blocking)).float()
        cond = None
        if self.condition_key is not None:
            if self.condition_key not in batchdata:
                raise KeyError(f"DiffusionTrainer: batch has no condition '{self.condition_key}' (got {list(batchdata)})")
            cond = torch.as_tensor(batchdata[self.condition_key].to(device, non_blocking=self.non_blocking)).float()

        x0 = self.encode(images) if self.autoencoder is not None else images
        noise = torch.randn_like(x0)
        timesteps = sample_timesteps(self.scheduler, x0)
        noisy = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        target = diffusion_target(self.scheduler, x0, noise, timesteps)
        kwargs: dict[str, Any] = {}
        if cond is not None:
            kwargs[self.condition_arg] = cond
        if self.condition_dropout > 0:
            kwargs["drop_condition"] = torch.rand(x0.shape[0], device=device) < self.condition_dropout

        self.network.train()
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        with self.autocast():
            pred = self.network(noisy, timesteps, **kwargs)
        loss = self.loss_fn(pred.float(), target.float())
        grad_norm = self.backward_step(loss, self.optimizer, self.scaler)

        scalars = {"loss": float(loss.detach())}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        output: dict[str, Any] = self.reduce_scalars(scalars)
        output.update({"image": images, "pred": pred.detach(), "target": target.detach(), "timesteps": timesteps})
        return output
