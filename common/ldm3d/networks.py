"""Mask-conditioned latent diffusion (Truong et al., SPIE 2024): MONAI's AutoencoderKL + a conditioned latent
``DiffusionModelUNet``; the tumor mask reaches the latent grid (concatenated) and the cross-attention (tokens)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.nets import AutoencoderKL

from common.conditions import ConditionedDenoiser, MaskCondition
from common.networks import build_unet

__all__ = ["MaskConditionedLDM", "build_ldm"]


class MaskConditionedLDM(ConditionedDenoiser):
    """The single ``network_def`` module: autoencoder + mask condition + latent UNet + latent scale factor.

    ``forward`` is the noise / velocity prediction in latent space (what the diffusion trainer calls);
    ``encode``/``decode`` map images to scaled latents and back (what the sampler calls last).
    ``scale_factor`` is a buffer (<= 0 means "not computed yet"); the trainer sets it to 1/std(z) once, so it
    is saved in the diffusion checkpoint and can never be lost or mismatched at inference.
    """

    def __init__(self, autoencoder: AutoencoderKL, unet, conditioner: MaskCondition, scale_factor: float = -1.0):
        super().__init__(unet, conditioner)
        self.autoencoder = autoencoder
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        for p in self.autoencoder.parameters():  # stage 1 is frozen during stage 2
            p.requires_grad_(False)

    def trainable_parameters(self):
        """UNet + conditioner parameters (the autoencoder is trained in stage 1 and frozen here)."""
        return [p for n, p in self.named_parameters() if not n.startswith("autoencoder.")]

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()
        return self

    def _check_scale(self):
        s = float(self.scale_factor)
        if not (s > 0 and math.isfinite(s)):
            raise RuntimeError("latent scale_factor is not set: load a trained diffusion checkpoint first")
        return self.scale_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> scaled latents (the space the diffusion model works in)."""
        return self.autoencoder.encode_stage_2_inputs(images) * self._check_scale()

    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic scaled latents (the posterior mean), for validation at fixed noise."""
        return self.autoencoder.encode(images)[0] * self._check_scale()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(latents / self._check_scale())


def build_ldm(
    autoencoder: AutoencoderKL,
    latent_channels: int = 8,
    labels: Sequence[int] = (1, 2, 3),
    base_channels: int = 256,
    channel_mult: Sequence[int] = (1, 1, 2),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int = 2,
    num_head_channels: int = 32,
    cross_attention_dim: int = 256,
    norm_num_groups: int = 32,
    conditioner_channels: Sequence[int] = (32, 64),
    condition_channels: int = 8,
    token_grid: Sequence[int] = (8, 8, 4),
) -> MaskConditionedLDM:
    """Paper-size defaults (base 256; 352 is the paper's larger model). The mask condition must halve the grid as
    many times as the autoencoder does (len(conditioner_channels) == len(autoencoder channels) - 1)."""
    unet = build_unet(
        latent_channels, condition_channels, None, base_channels, channel_mult, attention_levels, num_res_blocks,
        num_head_channels, cross_attention_dim, norm_num_groups,
    )
    conditioner = MaskCondition(
        3, labels, conditioner_channels, condition_channels, tokens=True, cross_attention_dim=cross_attention_dim,
        token_grid=token_grid, norm_num_groups=min(8, min(conditioner_channels)),
    )
    return MaskConditionedLDM(autoencoder, unet, conditioner)
