"""Condition encoders with learned null conditions, and the conditioned denoiser (see the package docstring)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from common.networks import one_hot_labels

__all__ = ["MaskCondition", "ClassCondition", "ImageCondition", "ConditionedDenoiser", "apply_drop"]


def apply_drop(value: torch.Tensor | None, null: torch.Tensor | None, drop: torch.Tensor | None):
    """``value`` with the samples where ``drop`` [B] is true replaced by ``null`` (broadcast to ``value``)."""
    if value is None or drop is None:
        return value
    drop = drop.to(device=value.device, dtype=torch.bool).view(-1, *([1] * (value.ndim - 1)))
    return torch.where(drop, null.to(value.dtype).expand_as(value), value)


class MaskCondition(nn.Module):
    """Label map -> (channels on the denoiser grid, cross-attention tokens), with a learned null condition.

    ``channels=()`` (pixel space, Med-DDPM): the one-hot mask itself is concatenated. Otherwise each entry of
    ``channels`` is a stride-2 stage (2 stages: 128x128x64 -> 32x32x16, the LDM latent grid) and a linear map of
    the average-pooled one-hot mask is added to the learned features, so the mask is a strong input from the
    first iteration (the tumor is a tiny part of the loss). Tokens (``tokens=True``) come from average-pooling the
    last stage to a fixed ``token_grid`` plus a learned position embedding, so their number does not depend on
    the volume size and the null tokens can be a plain parameter.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        labels: Sequence[int] = (1, 2, 3),
        channels: Sequence[int] = (),
        out_channels: int | None = None,
        tokens: bool = False,
        cross_attention_dim: int = 64,
        token_grid: Sequence[int] = (4, 4, 2),
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if tokens and not channels:
            raise ValueError("MaskCondition: tokens need at least one learned stage (channels)")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.labels = tuple(int(v) for v in labels)
        self.downsample = 2 ** len(channels)
        self.out_channels = int(out_channels) if channels else len(self.labels)
        if channels:
            layers: list[nn.Module] = []
            prev = len(self.labels)
            for ch in channels:
                layers += [conv(prev, ch, 3, stride=2, padding=1), nn.GroupNorm(min(norm_num_groups, ch), ch),
                           nn.SiLU(), conv(ch, ch, 3, padding=1), nn.SiLU()]
                prev = ch
            self.encoder = nn.Sequential(*layers)
            self.to_features = conv(prev, self.out_channels, 1)
            self.pool_mask = (nn.AvgPool3d if spatial_dims == 3 else nn.AvgPool2d)(self.downsample)
            self.mask_features = conv(len(self.labels), self.out_channels, 1)
            nn.init.normal_(self.mask_features.weight, std=1.0)
            nn.init.zeros_(self.mask_features.bias)
        self.null_features = nn.Parameter(torch.zeros(self.out_channels))
        self.with_tokens = bool(tokens)
        if tokens:
            self.token_grid = tuple(int(v) for v in token_grid)[:spatial_dims]
            num_tokens = math.prod(self.token_grid)
            self.pool = (nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d)(self.token_grid)
            self.to_tokens = nn.Linear(prev, cross_attention_dim)
            self.token_position = nn.Parameter(torch.randn(num_tokens, cross_attention_dim) * 0.02)
            self.null_tokens = nn.Parameter(torch.randn(num_tokens, cross_attention_dim) * 0.02)

    def forward(self, mask: torch.Tensor, drop: torch.Tensor | None = None):
        one_hot = one_hot_labels(mask, self.labels)
        if self.downsample == 1:
            features, tokens = one_hot, None
        else:
            hidden = self.encoder(one_hot)
            features = self.to_features(hidden) + self.mask_features(self.pool_mask(one_hot))
            tokens = None
            if self.with_tokens:
                tokens = self.to_tokens(self.pool(hidden).flatten(2).transpose(1, 2)) + self.token_position
        features = apply_drop(features, self.null_features.view(1, -1, *([1] * (features.ndim - 2))), drop)
        tokens = apply_drop(tokens, self.null_tokens[None] if self.with_tokens else None, drop)
        return features, tokens

    def grid(self, mask_spatial: Sequence[int]) -> tuple[int, ...]:
        """The denoiser grid for a mask grid (refuses a grid the stages cannot halve exactly)."""
        grid = tuple(int(s) // self.downsample for s in mask_spatial)
        if any(g * self.downsample != int(s) for g, s in zip(grid, mask_spatial)):
            raise ValueError(f"mask grid {tuple(mask_spatial)} is not divisible by {self.downsample}")
        return grid

    def null(self, batch: int, grid: Sequence[int], device=None, dtype=None):
        """The null condition for ``batch`` samples on the denoiser grid ``grid``."""
        features = self.null_features.view(1, -1, *([1] * len(grid))).expand(batch, -1, *grid)
        tokens = self.null_tokens.unsqueeze(0).expand(batch, -1, -1) if self.with_tokens else None
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return cast(features), cast(tokens)


class ClassCondition(nn.Module):
    """Integer class -> one token (``[B, 1, dim]``); index ``num_classes`` is the learned null class."""

    def __init__(self, num_classes: int = 2, embed_dim: int = 64):
        super().__init__()
        self.num_classes = int(num_classes)
        self.embedding = nn.Embedding(self.num_classes + 1, embed_dim)
        self.downsample = 1

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None):
        labels = labels.long().view(-1)
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.tolist()}")
        if drop is not None:
            labels = torch.where(drop.to(labels.device, torch.bool).view(-1), self.num_classes, labels)
        return None, self.embedding(labels)[:, None]

    def null(self, batch: int, grid: Sequence[int] = (), device=None, dtype=None):
        labels = torch.full((batch,), self.num_classes, device=device or self.embedding.weight.device)
        return None, self.embedding(labels)[:, None].to(dtype=dtype)


class ImageCondition(nn.Module):
    """Source images -> channels concatenated with the denoiser input; the null is a learned constant image."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.out_channels = int(in_channels)
        self.null_features = nn.Parameter(torch.zeros(self.out_channels))
        self.downsample = 1

    def forward(self, image: torch.Tensor, drop: torch.Tensor | None = None):
        return apply_drop(image, self.null_features.view(1, -1, *([1] * (image.ndim - 2))), drop), None

    def grid(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(s) for s in spatial)

    def null(self, batch: int, grid: Sequence[int], device=None, dtype=None):
        return self.null_features.view(1, -1, *([1] * len(grid))).expand(batch, -1, *grid).to(device, dtype), None


class ConditionedDenoiser(nn.Module):
    """A MONAI ``DiffusionModelUNet`` and a condition: ``unet(cat(x, channels), t, context=tokens)``.

    ``condition=None`` means unconditional (the null condition for every sample); ``drop_condition`` [B] swaps in
    the null condition per sample (condition dropout, classifier-free guidance).
    """

    def __init__(self, unet: nn.Module, conditioner: nn.Module):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def encode_condition(self, condition, batch: int, grid: Sequence[int], drop=None, device=None, dtype=None):
        """(channels, tokens) for ``batch`` samples on the denoiser grid (the null condition when None)."""
        if condition is None:
            return self.conditioner.null(batch, grid, device, dtype)
        channels, tokens = self.conditioner(condition, drop)
        if channels is not None and tuple(channels.shape[2:]) != tuple(grid):
            raise ValueError(f"condition grid {tuple(condition.shape[2:])} gives {tuple(channels.shape[2:])}, "
                             f"which does not match the denoiser grid {tuple(grid)}")
        return channels, tokens

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, channels, tokens) -> torch.Tensor:
        """One UNet call with an already encoded condition (the sampler encodes once per sample, not per step)."""
        if channels is not None:
            x = torch.cat([x, channels.to(x.dtype)], dim=1)
        return self.unet(x, timesteps, context=None if tokens is None else tokens.to(x.dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition=None, drop_condition=None) -> torch.Tensor:
        channels, tokens = self.encode_condition(condition, x.shape[0], x.shape[2:], drop_condition, x.device, x.dtype)
        return self.denoise(x, timesteps, channels, tokens)

    def sample_shape(self, condition_spatial: Sequence[int] | None = None) -> tuple[int, ...]:
        """(channels, *grid) of what the sampler draws for a condition of that spatial size."""
        if condition_spatial is None or not hasattr(self.conditioner, "grid"):
            raise ValueError("this denoiser needs an explicit sample shape (its condition carries no grid)")
        return (int(self.unet.out_channels), *self.conditioner.grid(condition_spatial))
