"""Generic building blocks configured once: MONAI's AutoencoderKL and DiffusionModelUNet as the bundles use them,
and label maps as one-hot channels."""

from __future__ import annotations

from typing import Sequence

import torch

from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

from common.io import check_bool, check_bool_list

__all__ = ["one_hot_labels", "build_autoencoder", "build_unet", "checkpoint_blocks"]


def one_hot_labels(mask: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """[B,1,...] label map -> [B,len(labels),...] float one-hot (background is implicit); one-hot input passes."""
    if mask.shape[1] == 1:
        return torch.cat([(mask == lab) for lab in labels], dim=1).float()
    if mask.shape[1] == len(labels):
        return mask.float()
    raise ValueError(f"mask must have 1 channel (label map) or {len(labels)} (one-hot), got {mask.shape[1]}")


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
        use_checkpoint=check_bool("ae_gradient_checkpointing", use_checkpoint),  # the bundle id users set
    )


def build_unet(
    in_channels: int = 8,
    condition_channels: int = 0,
    out_channels: int | None = None,
    base_channels: int = 256,
    channel_mult: Sequence[int] = (1, 1, 2),
    attention_levels: Sequence[bool] = (False, True, True),
    num_res_blocks: int = 2,
    num_head_channels: int = 32,
    cross_attention_dim: int | None = None,
    norm_num_groups: int = 32,
    spatial_dims: int = 3,
    use_flash_attention: bool = False,
    gradient_checkpointing: bool = False,
) -> DiffusionModelUNet:
    """A MONAI ``DiffusionModelUNet`` whose input is ``in_channels`` (noisy image or latent) plus the condition's
    ``condition_channels``; output ``out_channels`` (default ``in_channels``); cross-attention when
    ``cross_attention_dim`` is set. ``use_flash_attention``: PyTorch's fused attention (CUDA).
    ``gradient_checkpointing``: recompute each block's activations in the backward pass (:func:`checkpoint_blocks`),
    which MONAI's UNet does not offer: pixel-space 3D UNets at 192x192x144 otherwise hold every activation."""
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels + condition_channels,
        out_channels=in_channels if out_channels is None else out_channels,
        channels=tuple(base_channels * m for m in channel_mult),
        attention_levels=check_bool_list("unet_attention_levels", attention_levels),  # the bundle id users set
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
        use_flash_attention=use_flash_attention,
    )
    return checkpoint_blocks(unet) if check_bool("gradient_checkpointing", gradient_checkpointing) else unet


def checkpoint_blocks(unet: DiffusionModelUNet) -> DiffusionModelUNet:
    """Run every down, middle and up block of a MONAI ``DiffusionModelUNet`` under ``torch.utils.checkpoint``
    while training (the same parameters and state-dict keys; eval and no-grad calls are untouched)."""
    from torch.utils.checkpoint import checkpoint

    def wrap(block: torch.nn.Module) -> None:
        inner = block.forward

        def forward(*args, **kwargs):
            if block.training and torch.is_grad_enabled():
                return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        block.forward = forward

    for block in [*unet.down_blocks, unet.middle_block, *unet.up_blocks]:
        wrap(block)
    return unet
