"""One conditional sampling loop for pixel- and latent-space diffusion (DDPM, DDIM, rectified flow), usable as a
MONAI-style inferer: ``sampler(inputs=conditions, network=denoiser)``.

The network is a :class:`common.conditions.ConditionedDenoiser` (or anything with the same methods):
``sample_shape(condition_spatial)`` says what to draw, ``encode_condition`` runs once per sample (not per step),
``denoise`` is one UNet call, and an optional ``decode`` maps latents to images (latent diffusion). Classifier-free
guidance mixes the conditional and null-condition predictions in one batched call. Every sample has its own seed
(its own ``torch.Generator``) for the initial noise and every stochastic step, so a sample is the same whatever
batch it was drawn in.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from common.io import DataError, check_bool

__all__ = ["SAMPLERS", "DiffusionSampler", "make_scheduler"]

SAMPLERS = ("ddpm", "ddim", "rflow")


def make_scheduler(
    sampler: str = "ddim",
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_range: Sequence[float] = (-1.0, 1.0),
):
    """A MONAI scheduler for sampling; DDPM/DDIM must use the betas the model was trained with.

    ``clip_sample`` clips each step's predicted x0 to ``clip_range`` (the data's range, e.g. [0, 1] for Med-DDPM
    images): without it a few-step DDIM on a cosine schedule divides by a tiny sqrt(alpha_bar) at the first steps
    and the estimate runs away. Off for latents and z-scored images, which are unbounded.
    """
    name = str(sampler).lower()
    if name in ("ddpm", "ddim"):
        cls = DDPMScheduler if name == "ddpm" else DDIMScheduler
        kwargs = {} if schedule == "cosine" else {"beta_start": beta_start, "beta_end": beta_end}
        lo, hi = (float(v) for v in clip_range)
        return cls(num_train_timesteps, schedule, clip_sample=check_bool("clip_sample", clip_sample),
                   prediction_type=prediction_type, clip_sample_min=lo, clip_sample_max=hi, **kwargs)
    if name == "rflow":
        return RFlowScheduler(num_train_timesteps, use_discrete_timesteps=True)
    raise DataError("--sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


class DiffusionSampler:
    """Draws ``num_samples`` samples per condition: noise -> denoising loop -> (decoder).

    Args:
        scheduler: a MONAI DDPMScheduler, DDIMScheduler or RFlowScheduler (see :func:`make_scheduler`).
        num_inference_steps: DDPM must use every training step (MONAI's DDPM step is not strided); DDIM and
            rectified flow take any number >= 1.
        guidance_scale: classifier-free guidance weight w (pred = uncond + w * (cond - uncond)); 1 = no guidance.
        num_samples: samples per condition; seeds: one per sample (default ``seed + i``), the same for every
            condition so that conditions are compared on identical noise.
        shape: (channels, *grid) to draw; default from ``network.sample_shape`` (mask / image conditions).
        batch_size: samples run through the network together (a memory knob; results do not depend on it).
    """

    def __init__(
        self,
        scheduler,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        shape: Sequence[int] | None = None,
        batch_size: int = 4,
        eta: float = 0.0,
        progress: bool = True,
    ):
        if int(num_inference_steps) < 1:
            raise DataError("--num_inference_steps", f"must be >= 1, got {num_inference_steps}")
        if isinstance(scheduler, DDPMScheduler) and num_inference_steps != scheduler.num_train_timesteps:
            raise DataError(
                "--num_inference_steps", f"DDPM sampling needs all {scheduler.num_train_timesteps} training steps (got {num_inference_steps}); "
                "use the 'ddim' or 'rflow' sampler for fewer steps"
            )
        if int(num_samples) < 1:
            raise DataError("--num_samples", f"must be >= 1, got {num_samples}")
        if seeds is not None and len(seeds) != num_samples:
            raise DataError("--seeds", f"got {len(seeds)} seeds for {num_samples} samples")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.num_samples = int(num_samples)
        self.seeds = [int(s) for s in seeds] if seeds is not None else [int(seed) + i for i in range(self.num_samples)]
        self.shape = tuple(int(s) for s in shape) if shape is not None else None
        self.batch_size = max(1, int(batch_size))
        self.eta = float(eta)
        self.progress = progress

    def describe(self) -> dict:
        """What a manifest records about how samples were drawn."""
        return {"sampler": type(self.scheduler).__name__, "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "eta": self.eta}

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor | None, network, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """``inputs``: conditions [B, ...] (None: unconditional, one set) -> samples [B * num_samples, ...]
        in condition-major order."""
        network = getattr(network, "module", network)  # DDP / DataParallel wrappers
        seeds = [int(s) for s in seeds] if seeds is not None else self.seeds
        conditions = [None] if inputs is None else [inputs[b : b + 1] for b in range(inputs.shape[0])]
        out = []
        for cond in conditions:
            shape = self.shape or network.sample_shape(None if cond is None or cond.ndim < 3 else cond.shape[2:])
            for start in range(0, len(seeds), self.batch_size):
                out.append(self._sample(network, cond, seeds[start : start + self.batch_size], shape))
        return torch.cat(out, 0)

    def _timesteps(self, shape, device):
        sched = self.scheduler
        if isinstance(sched, RFlowScheduler):
            numel = 1
            for s in shape[1:]:
                numel *= int(s)
            sched.set_timesteps(self.num_inference_steps, device=device, input_img_size_numel=numel)
            steps = list(sched.timesteps)
            return list(zip(steps, steps[1:] + [torch.tensor(0, device=device)]))
        sched.set_timesteps(self.num_inference_steps, device=device)
        return [(t, None) for t in sched.timesteps]

    def _sample(self, network, cond, seeds, shape):
        from tqdm.auto import tqdm

        param = next(network.parameters())
        device, dtype = param.device, param.dtype
        n = len(seeds)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn((1, *shape), generator=g, device=device, dtype=dtype) for g in gens])
        grid = tuple(shape[1:])
        if cond is not None:
            cond = cond.to(device)
            cond = cond.expand(n, *cond.shape[1:])
        channels, tokens = network.encode_condition(cond, n, grid, None, device, dtype)
        guided = self.guidance_scale != 1.0 and cond is not None
        if guided:
            null_c, null_t = network.encode_condition(None, n, grid, None, device, dtype)
            channels = None if channels is None else torch.cat([channels, null_c])
            tokens = None if tokens is None else torch.cat([tokens, null_t])
        sched = self.scheduler
        discrete = isinstance(sched, (DDPMScheduler, DDIMScheduler))
        for t, t_next in tqdm(self._timesteps(shape, device), desc="sampling", disable=not self.progress, leave=False):
            ts = torch.full((n,), float(t), device=device)
            ts = ts.long() if discrete else ts
            if guided:
                both = network.denoise(torch.cat([x, x]), torch.cat([ts, ts]), channels, tokens)
                c, u = both.chunk(2)
                pred = u + self.guidance_scale * (c - u)
            else:
                pred = network.denoise(x, ts, channels, tokens)
            if isinstance(sched, RFlowScheduler):
                x, _ = sched.step(pred, t, x, t_next)
            else:  # per-sample generators for the stochastic part of the step
                kwargs = {"eta": self.eta} if isinstance(sched, DDIMScheduler) else {}
                x = torch.cat([sched.step(pred[i : i + 1], int(t), x[i : i + 1], generator=g, **kwargs)[0]
                               for i, g in enumerate(gens)])
        return network.decode(x) if hasattr(network, "decode") else x
