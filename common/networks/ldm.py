"""Mask-conditioned latent diffusion (Truong et al., SPIE 2024) built from MONAI's AutoencoderKL and
DiffusionModelUNet: a learned conditioner brings the tumor mask to the latent grid (concatenated with the
latent) and turns it into tokens for the UNet's cross-attention."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from monai.networks.nets import AutoencoderKL, DiffusionModelUNet


def one_hot_labels(mask: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """[B,1,...] label map -> [B,len(labels),...] float one-hot (background is implicit); one-hot input passes."""
    if mask.shape[1] == 1:
        return torch.cat([(mask == lab) for lab in labels], dim=1).float()
    if mask.shape[1] == len(labels):
        return mask.float()
    raise ValueError(f"mask must have 1 channel (label map) or {len(labels)} (one-hot), got {mask.shape[1]}")


class MaskConditioner(nn.Module):
    """Tumor mask -> (feature map on the latent grid, cross-attention tokens), with a learned null condition.

    Each stage halves the grid (stride-2 conv), so ``len(channels)`` stages give a 2**len(channels) reduction
    (2 stages: 128x128x64 -> 32x32x16, the paper's latent grid); a linear map of the average-pooled one-hot mask
    is added to the learned features so the mask is a strong input from the start. Tokens come from average-pooling the last
    stage to a fixed ``token_grid`` plus a learned position embedding, so their number does not depend on the
    volume size and the null condition (for classifier-free guidance) can be a plain learned parameter.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        labels: Sequence[int] = (1, 2, 3),
        channels: Sequence[int] = (32, 64),
        out_channels: int = 8,
        cross_attention_dim: int = 64,
        token_grid: Sequence[int] = (4, 4, 2),
        norm_num_groups: int = 8,
    ):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.labels = tuple(int(v) for v in labels)
        self.token_grid = tuple(int(v) for v in token_grid)[:spatial_dims]
        layers: list[nn.Module] = []
        prev = len(self.labels)
        for ch in channels:
            layers += [
                conv(prev, ch, 3, stride=2, padding=1),
                nn.GroupNorm(min(norm_num_groups, ch), ch),
                nn.SiLU(),
                conv(ch, ch, 3, padding=1),
                nn.SiLU(),
            ]
            prev = ch
        self.encoder = nn.Sequential(*layers)
        self.to_features = conv(prev, out_channels, 1)
        # linear path from the average-pooled one-hot mask (label fractions per latent voxel): a strong, clean
        # signal from the first iteration, which the learned path refines (the tumor is a tiny part of the loss)
        pool_mask = nn.AvgPool3d if spatial_dims == 3 else nn.AvgPool2d
        self.pool_mask = pool_mask(2 ** len(channels))
        self.mask_features = conv(len(self.labels), out_channels, 1)
        nn.init.normal_(self.mask_features.weight, std=1.0)
        nn.init.zeros_(self.mask_features.bias)
        pool = nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d
        self.pool = pool(self.token_grid)
        num_tokens = math.prod(self.token_grid)
        self.to_tokens = nn.Linear(prev, cross_attention_dim)
        self.token_position = nn.Parameter(torch.randn(num_tokens, cross_attention_dim) * 0.02)
        self.null_features = nn.Parameter(torch.zeros(out_channels))
        self.null_tokens = nn.Parameter(torch.randn(num_tokens, cross_attention_dim) * 0.02)
        self.out_channels = out_channels
        self.downsample = 2 ** len(channels)

    def forward(
        self, mask: torch.Tensor, drop_condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        one_hot = one_hot_labels(mask, self.labels)
        hidden = self.encoder(one_hot)
        features = self.to_features(hidden) + self.mask_features(self.pool_mask(one_hot))
        tokens = self.to_tokens(self.pool(hidden).flatten(2).transpose(1, 2)) + self.token_position
        if drop_condition is not None:
            drop = drop_condition.to(device=features.device, dtype=torch.bool).view(-1)
            null_f = self.null_features.view(1, -1, *([1] * (features.ndim - 2))).expand_as(features)
            features = torch.where(drop.view(-1, *([1] * (features.ndim - 1))), null_f, features)
            tokens = torch.where(drop.view(-1, 1, 1), self.null_tokens.expand_as(tokens), tokens)
        return features, tokens

    def null_condition(self, batch: int, latent_shape: Sequence[int], device=None, dtype=None):
        """The unconditional (dropped) condition for ``batch`` latents of spatial size ``latent_shape``."""
        features = self.null_features.view(1, -1, *([1] * len(latent_shape))).expand(batch, -1, *latent_shape)
        tokens = self.null_tokens.unsqueeze(0).expand(batch, -1, -1)
        return features.to(device=device, dtype=dtype), tokens.to(device=device, dtype=dtype)


class MaskConditionedLDM(nn.Module):
    """The single ``network_def`` module: autoencoder + conditioner + latent UNet + latent scale factor.

    ``forward`` is the noise / velocity prediction in latent space (what the diffusion trainer calls).
    ``scale_factor`` is a buffer (<= 0 means "not computed yet"); the trainer sets it to 1/std(z) once, so it
    is saved in the diffusion checkpoint and can never be lost or mismatched at inference.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        unet: DiffusionModelUNet,
        conditioner: MaskConditioner,
        scale_factor: float = -1.0,
    ):
        super().__init__()
        self.autoencoder = autoencoder
        self.unet = unet
        self.conditioner = conditioner
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
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(latents / self._check_scale())

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        drop_condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if condition is None:
            features, tokens = self.conditioner.null_condition(x.shape[0], x.shape[2:], x.device, x.dtype)
        else:
            features, tokens = self.conditioner(condition, drop_condition)
            if features.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"mask grid {tuple(condition.shape[2:])} reduces to {tuple(features.shape[2:])}, "
                    f"which does not match the latent grid {tuple(x.shape[2:])}"
                )
        return self.unet(torch.cat([x, features.to(x.dtype)], dim=1), timesteps, context=tokens.to(x.dtype))


def build_autoencoder(
    in_channels: int = 4,
    latent_channels: int = 8,
    channels: Sequence[int] = (64, 128, 256),
    num_res_blocks: int = 2,
    norm_num_groups: int = 32,
    attention: bool = False,
    use_checkpoint: bool = False,
) -> AutoencoderKL:
    """The paper's stage 1: len(channels)-1 halvings (3 levels: 4x, 4x128x128x64 -> 8x32x32x16).

    ``use_checkpoint`` recomputes activations in the backward pass (less memory, see ``tools benchmark``)."""
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        latent_channels=latent_channels,
        num_res_blocks=num_res_blocks,
        norm_num_groups=norm_num_groups,
        attention_levels=(False,) * len(channels),
        with_encoder_nonlocal_attn=attention,
        with_decoder_nonlocal_attn=attention,
        use_checkpoint=use_checkpoint,
    )


def build_unet(
    latent_channels: int = 8,
    condition_channels: int = 8,
    base_channels: int = 256,
    channel_mult: Sequence[int] = (1, 1, 2),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int = 2,
    num_head_channels: int = 32,
    cross_attention_dim: int = 256,
    norm_num_groups: int = 32,
) -> DiffusionModelUNet:
    """Latent UNet with cross-attention; input = latent concatenated with the conditioner's feature map."""
    channels = tuple(base_channels * m for m in channel_mult)
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels + condition_channels,
        out_channels=latent_channels,
        channels=channels,
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        with_conditioning=True,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
    )


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
    """Paper-size defaults (base 256; 352 is the paper's larger model). The conditioner must halve the grid as
    many times as the autoencoder does (len(conditioner_channels) == len(autoencoder channels) - 1)."""
    unet = build_unet(
        latent_channels, condition_channels, base_channels, channel_mult, attention_levels, num_res_blocks,
        num_head_channels, cross_attention_dim, norm_num_groups,
    )
    conditioner = MaskConditioner(
        3, labels, conditioner_channels, condition_channels, cross_attention_dim, token_grid,
        norm_num_groups=min(8, min(conditioner_channels)),
    )
    return MaskConditionedLDM(autoencoder, unet, conditioner)
