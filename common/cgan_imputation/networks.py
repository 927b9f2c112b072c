"""pix2pix networks of Genc et al. (ISMRM 2022): a ResNet-block generator and MONAI's 70x70 PatchGAN.

MONAI has a PatchGAN (``PatchDiscriminator``) but no pix2pix ResNet generator, so it is written here once, from
MONAI ``Convolution`` blocks (conv + instance norm + ReLU) with reflection padding in front, as in Isola et al.
(2017) / Johnson et al. (2016): 7x7 stem, 2 stride-2 downsamplings, ``n_blocks`` residual blocks, 2 transposed-conv
upsamplings, 7x7 head.

Output activation (``output``): ``"linear"`` (default) for the [0, 1] percentile-scaled images of this bundle and
for z-scored images. A tanh can reach the background value (0 in [0, 1] after the 0.5-99.5 % brain-percentile
scaling, or the clipped top where bright lesions sit) only asymptotically, so the L1 and lesion-mask losses fight a
vanishing gradient exactly at the voxels they care most about, and a z-scored image has no fixed bounds at all;
with a linear head the losses reach those values directly and imputation clamps the result to [0, 1].
``"tanh"`` is the original pix2pix head, for images scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.nets import PatchDiscriminator
from monai.networks.utils import normal_init

OUTPUTS = ("linear", "tanh")

# pix2pix defaults (Isola et al. 2017; ../shared/notes/ANCHORS.md): resnet_9blocks, ngf = ndf = 64, n_layers_D = 3
PAPER_GENERATOR = {"base_channels": 64, "n_blocks": 9, "n_downsampling": 2}
PAPER_DISCRIMINATOR = {"channels": 64, "num_layers_d": 3}
# the bundle's CPU demo size
DEMO_GENERATOR = {"base_channels": 16, "n_blocks": 3, "n_downsampling": 2}
DEMO_DISCRIMINATOR = {"channels": 16, "num_layers_d": 3}


def _reflect(spatial_dims: int, pad: int) -> nn.Module:
    return (nn.ReflectionPad2d if spatial_dims == 2 else nn.ReflectionPad3d)(pad)


def _conv(spatial_dims, cin, cout, kernel, stride=1, act="RELU", transposed=False, padding=0, conv_only=False):
    # instance norm without affine parameters, biases kept (pix2pix: use_bias when the norm is InstanceNorm)
    return Convolution(
        spatial_dims, cin, cout, strides=stride, kernel_size=kernel, adn_ordering="NA", act=act,
        norm=("INSTANCE", {"affine": False}), bias=True, padding=padding, conv_only=conv_only,
        is_transposed=transposed, output_padding=1 if transposed else None,
    )


class ResnetBlock(nn.Module):
    """x + (reflect-pad, conv3, IN, ReLU, reflect-pad, conv3, IN)(x)."""

    def __init__(self, spatial_dims: int, channels: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [_reflect(spatial_dims, 1), _conv(spatial_dims, channels, channels, 3)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [_reflect(spatial_dims, 1), _conv(spatial_dims, channels, channels, 3, act=None)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """pix2pix ResNet generator: ``in_channels`` acquired contrasts -> ``out_channels`` missing contrast(s).

    Fully convolutional: any input whose sides are divisible by ``2 ** n_downsampling`` keeps its size
    (256x256 -> 256x256). ``config`` holds the constructor arguments, saved with the weights so
    ``python -m tools impute`` rebuilds the same network.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        output: str = "linear",
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if in_channels < 1 or out_channels < 1 or n_blocks < 0 or n_downsampling < 0 or base_channels < 1:
            raise ValueError("in/out/base channels must be >= 1 and n_blocks, n_downsampling >= 0")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, out_channels=out_channels, base_channels=base_channels, n_blocks=n_blocks,
            n_downsampling=n_downsampling, output=output, dropout=dropout, spatial_dims=spatial_dims,
        )
        d, c = spatial_dims, base_channels
        layers: list[nn.Module] = [_reflect(d, 3), _conv(d, in_channels, c, 7)]
        for i in range(n_downsampling):
            layers.append(_conv(d, c * 2**i, c * 2 ** (i + 1), 3, stride=2, padding=1))
        width = c * 2**n_downsampling
        layers += [ResnetBlock(d, width, dropout) for _ in range(n_blocks)]
        for i in range(n_downsampling, 0, -1):
            layers.append(_conv(d, c * 2**i, c * 2 ** (i - 1), 3, stride=2, padding=1, transposed=True))
        layers += [_reflect(d, 3), _conv(d, c, out_channels, 7, conv_only=True)]
        if output == "tanh":
            layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)
        self.apply(normal_init)  # pix2pix init: N(0, 0.02) weights, zero biases
        self.multiple = 2**n_downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [s for s in x.shape[2:] if s % self.multiple]
        if bad:
            raise ValueError(f"input sides {tuple(x.shape[2:])} must be divisible by {self.multiple} (pad first)")
        return self.model(x)


def build_generator(n_sources: int = 1, size: str | None = "paper", **overrides) -> ResnetGenerator:
    """The generator for ``n_sources`` acquired contrasts -> 1 missing one; ``size`` picks paper/demo defaults."""
    base = {"paper": PAPER_GENERATOR, "demo": DEMO_GENERATOR, None: {}}[size]
    return ResnetGenerator(in_channels=n_sources, out_channels=1, **{**base, **overrides})


def build_discriminator(n_sources: int = 1, size: str | None = "paper", norm: str = "INSTANCE",
                        **overrides) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` seeing the source contrasts concatenated with the real or generated target.

    3 layers, kernel 4, padding 1 = the 70x70 PatchGAN (256x256 in -> 30x30 logits). Instance norm like the
    generator (batch norm over the paper's 2-4 slices per step is noisy); the last element of its output list
    is the logit map.
    """
    base = {"paper": PAPER_DISCRIMINATOR, "demo": DEMO_DISCRIMINATOR, None: {}}[size]
    kwargs = dict(spatial_dims=2, in_channels=n_sources + 1, out_channels=1, kernel_size=4, padding=1, norm=norm)
    return PatchDiscriminator(**{**kwargs, **base, **overrides})


def generator_config_from_state(state: dict) -> dict:
    """Constructor arguments of a ``ResnetGenerator`` read off its state dict (for weights saved without them).

    The output activation leaves no trace in the weights: ``linear`` is assumed.
    """
    convs = sorted(
        (k for k, v in state.items() if k.endswith(".weight") and getattr(v, "ndim", 0) >= 4),
        key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")],
    )
    if not convs or not convs[0].startswith("model."):
        raise ValueError("not a ResnetGenerator state dict (no model.* convolution weights)")
    first, last = state[convs[0]], state[convs[-1]]
    blocks = {k.split(".")[1] for k in state if ".body." in k}
    # outside the residual blocks: stem, n_downsampling convs, as many transposed convs, head
    resampling = sum(1 for k in convs if ".body." not in k) - 2
    return dict(
        in_channels=int(first.shape[1]), out_channels=int(last.shape[0]), base_channels=int(first.shape[0]),
        n_blocks=len(blocks), n_downsampling=max(0, resampling // 2), output="linear",
        spatial_dims=first.ndim - 2,
    )
