"""Sampling loop for a mask-conditioned LDM, usable as a MONAI-style inferer: ``inferer(inputs=mask, network=ldm)``.

DDPM (all training steps), DDIM (any number of steps) and rectified flow (MONAI RFlowScheduler) share one loop;
classifier-free guidance mixes the conditional and null-condition predictions. Every sample has its own seed
(its own torch.Generator), so a sample is reproducible whatever batch it was drawn in.
"""

from __future__ import annotations

from typing import Sequence

import torch

from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

SAMPLERS = ("ddpm", "ddim", "rflow")


def make_sampling_scheduler(
    sampler: str = "ddim",
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    prediction_type: str = "epsilon",
):
    """A MONAI scheduler for sampling; DDPM/DDIM must use the betas the model was trained with.

    Latents are not bounded to [-1, 1], so predicted-x0 clipping is off.
    """
    sampler = sampler.lower()
    if sampler == "ddpm":
        return DDPMScheduler(
            num_train_timesteps, schedule, clip_sample=False, prediction_type=prediction_type,
            beta_start=beta_start, beta_end=beta_end,
        )
    if sampler == "ddim":
        return DDIMScheduler(
            num_train_timesteps, schedule, clip_sample=False, prediction_type=prediction_type,
            beta_start=beta_start, beta_end=beta_end,
        )
    if sampler == "rflow":
        return RFlowScheduler(num_train_timesteps, use_discrete_timesteps=True)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


class MaskConditionedSampler:
    """Generates ``num_samples`` image sets per mask: noise -> denoising loop in latent space -> decoder.

    Args:
        scheduler: a MONAI DDPMScheduler, DDIMScheduler or RFlowScheduler (see ``make_sampling_scheduler``).
        num_inference_steps: DDPM must use every training step (MONAI's DDPM step is not strided); DDIM and
            rectified flow take any number.
        guidance_scale: classifier-free guidance weight w (pred = uncond + w * (cond - uncond)); 1 = no guidance.
        num_samples: samples per mask; seeds: one per sample (default ``seed + i``), the same for every mask so
            that masks are compared on identical noise.
        latent_shape: latent channels and grid; default = (unet out channels, mask grid / conditioner downsample).
        batch_size: samples run through the network together (memory knob; results do not depend on it).
    """

    def __init__(
        self,
        scheduler,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        latent_shape: Sequence[int] | None = None,
        batch_size: int = 4,
        eta: float = 0.0,
        progress: bool = True,
    ):
        if isinstance(scheduler, DDPMScheduler) and num_inference_steps != scheduler.num_train_timesteps:
            raise ValueError(
                f"DDPM sampling needs all {scheduler.num_train_timesteps} training steps (got {num_inference_steps}); "
                "use the 'ddim' sampler for fewer steps"
            )
        if seeds is not None and len(seeds) != num_samples:
            raise ValueError(f"got {len(seeds)} seeds for {num_samples} samples")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.num_samples = int(num_samples)
        self.seeds = [int(s) for s in seeds] if seeds is not None else [int(seed) + i for i in range(num_samples)]
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.batch_size = max(1, int(batch_size))
        self.eta = float(eta)
        self.progress = progress

    def _latent_shape(self, mask: torch.Tensor, network) -> tuple[int, ...]:
        if self.latent_shape is not None:
            return self.latent_shape
        down = network.conditioner.downsample
        grid = tuple(s // down for s in mask.shape[2:])
        if any(s * down != m for s, m in zip(grid, mask.shape[2:])):
            raise ValueError(f"mask grid {tuple(mask.shape[2:])} is not divisible by {down}")
        return (network.unet.out_channels, *grid)

    def _predict(self, network, latents, t, features, tokens, null_features, null_tokens):
        timesteps = torch.full((latents.shape[0],), float(t), device=latents.device)
        if isinstance(self.scheduler, (DDPMScheduler, DDIMScheduler)):
            timesteps = timesteps.long()
        unet = network.unet
        if self.guidance_scale == 1.0:
            return unet(torch.cat([latents, features], 1), timesteps, context=tokens)
        both = unet(
            torch.cat([torch.cat([latents, features], 1), torch.cat([latents, null_features], 1)], 0),
            torch.cat([timesteps, timesteps]),
            context=torch.cat([tokens, null_tokens]),
        )
        cond, uncond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``inputs``: masks [B,1,H,W,D] -> images [B * num_samples, C, H, W, D] (mask-major order)."""
        network = getattr(network, "module", network)  # DDP / DataParallel wrappers
        seeds = [int(s) for s in seeds] if seeds is not None else self.seeds
        device = inputs.device
        lshape = self._latent_shape(inputs, network)
        out = []
        for b in range(inputs.shape[0]):
            mask = inputs[b : b + 1]
            for start in range(0, len(seeds), self.batch_size):
                chunk = seeds[start : start + self.batch_size]
                out.append(self._sample(network, mask, chunk, lshape, device))
        return torch.cat(out, 0)

    def _sample(self, network, mask, seeds, lshape, device):
        from tqdm.auto import tqdm

        n = len(seeds)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        dtype = next(network.unet.parameters()).dtype
        latents = torch.cat([torch.randn((1, *lshape), generator=g, device=device, dtype=dtype) for g in gens])
        features, tokens = network.conditioner(mask.to(device))
        features, tokens = features.expand(n, *features.shape[1:]), tokens.expand(n, *tokens.shape[1:])
        null_features, null_tokens = network.conditioner.null_condition(n, lshape[1:], device, dtype)
        sched = self.scheduler
        if isinstance(sched, RFlowScheduler):
            sched.set_timesteps(self.num_inference_steps, device=device, input_img_size_numel=int(torch.tensor(lshape[1:]).prod()))
            steps = list(sched.timesteps)
            nexts = steps[1:] + [torch.tensor(0, device=device)]
        else:
            sched.set_timesteps(self.num_inference_steps, device=device)
            steps = list(sched.timesteps)
            nexts = [None] * len(steps)
        for t, t_next in tqdm(list(zip(steps, nexts)), desc="sampling", disable=not self.progress, leave=False):
            pred = self._predict(network, latents, t, features, tokens, null_features, null_tokens)
            if isinstance(sched, RFlowScheduler):
                latents, _ = sched.step(pred, t, latents, t_next)
            else:  # per-sample generators for the stochastic part of the step
                parts = []
                for i, g in enumerate(gens):
                    kwargs = {"eta": self.eta} if isinstance(sched, DDIMScheduler) else {}
                    parts.append(sched.step(pred[i : i + 1], int(t), latents[i : i + 1], generator=g, **kwargs)[0])
                latents = torch.cat(parts)
        return network.decode(latents)
