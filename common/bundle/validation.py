"""Seeded validation of a latent diffusion model: the denoising loss on held-out cases at fixed timesteps and
fixed noise, so the number moves only when the model does."""

from __future__ import annotations

from typing import Sequence

import torch


class DenoisingLossInferer:
    """``inferer(images, network, condition=mask)`` -> per-case mean squared error of the diffusion target
    ([B, 1]), averaged over ``timesteps`` (evenly spread over training steps unless given).

    Use with ``SupervisedEvaluator`` and ``MeanAbsoluteError`` against zeros: the MAE of a non-negative
    error against 0 is the error itself.
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
        x0 = net.autoencoder.encode(images)[0] * net.scale_factor  # z_mu: deterministic latents
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


def prepare_condition_batch(batch, device, non_blocking: bool = False, **kwargs):
    """SupervisedEvaluator batch -> (images, zero targets, (), {"condition": mask})."""
    images = batch["image"].to(device, non_blocking=non_blocking)
    mask = batch["label"].to(device, non_blocking=non_blocking)
    return images, torch.zeros(images.shape[0], 1, device=device), (), {"condition": mask}
