"""Perceptual loss with a *local* weight file (nothing is downloaded): MedicalNet 3D, RadImageNet 2.5D, or off.

MONAI's PerceptualLoss fetches MedicalNet / RadImageNet through torch.hub; here the same MONAI similarity code
runs on a network built locally and filled from a state dict on disk (loaded with weights_only=True).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from common.io import DataError, torch_load

KINDS = ("off", "medicalnet", "radimagenet")


class _ResNetFeatures(nn.Module):
    """A MONAI 3D ResNet cut after layer4: the spatial feature map MedicalNet's perceptual loss compares."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(x)))
        if not r.no_max_pool:
            x = r.maxpool(x)
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))


def medicalnet_resnet(depth: int = 10) -> nn.Module:
    """MedicalNet's 3D ResNet architecture (one input channel), as MONAI builds it."""
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    return getattr(resnet, f"resnet{depth}")(
        pretrained=False, spatial_dims=3, n_input_channels=1, feed_forward=False,
        shortcut_type=shortcut_type, bias_downsample=bias_downsample,
    )


def _load_state_dict(path: str | os.PathLike, key: str | None) -> dict:
    state = torch_load(path)
    if key is not None:
        if key not in state:
            raise DataError(path, f"no key {key!r} in the weight file (keys: {list(state)[:5]}...)")
        state = state[key]
    # MedicalNet checkpoints were saved from DataParallel ("module." prefix)
    return {k.removeprefix("module."): v for k, v in state.items()}


class MedicalNetPerceptualLoss(nn.Module):
    """3D perceptual loss on MedicalNet features from a local file (MONAI's similarity, channel by channel)."""

    def __init__(self, weights_path: str | os.PathLike, depth: int = 10, state_dict_key: str | None = "state_dict"):
        super().__init__()
        from monai.losses.perceptual import MedicalNetPerceptualSimilarity

        net = medicalnet_resnet(depth)
        state = _load_state_dict(weights_path, state_dict_key)
        try:
            _strict_load(net, state, weights_path)
        except RuntimeError as exc:
            raise DataError(weights_path, f"not a MedicalNet resnet{depth} state dict ({exc})") from exc
        class LocalMedicalNetSimilarity(MedicalNetPerceptualSimilarity):
            """MONAI's similarity (its forward: per-channel features, normalised, compared) on a network built
            here: MONAI's ``__init__`` only fetches the network through torch.hub, which is offline."""

            def __init__(self, model: nn.Module, channel_wise: bool = False):
                nn.Module.__init__(self)
                self.model, self.channel_wise = model, channel_wise

        self.similarity = LocalMedicalNetSimilarity(_ResNetFeatures(net))
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # frozen feature extractor: batch norm stays in eval mode
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.similarity(input.float(), target.float()).mean()


def _strict_load(net: nn.Module, state: dict, path) -> None:
    """Load ignoring a classifier head (``fc``) that the feature extractor does not use."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def build_perceptual_loss(
    kind: str = "off",
    weights_path: str | os.PathLike | None = None,
    state_dict_key: str | None = None,
    depth: int = 10,
    fake_3d_ratio: float = 0.25,
) -> nn.Module | None:
    """``kind``: "off" -> None; "medicalnet" -> 3D MedicalNet ResNet-``depth`` (MedicalNet's ``resnet_10.pth``,
    key "state_dict"); "radimagenet" -> 2.5D torchvision ResNet-50 (RadImageNet weights converted to torchvision
    key names) on a ``fake_3d_ratio`` fraction of slices along each axis."""
    kind = (kind or "off").lower()
    if kind == "off":
        return None
    if kind not in KINDS:
        raise ValueError(f"unknown perceptual network {kind!r}; choose one of {KINDS}")
    if weights_path is None or not Path(weights_path).is_file():
        raise DataError(weights_path, f"the {kind} perceptual loss needs a local weight file (see the bundle docs)")
    if kind == "medicalnet":
        return MedicalNetPerceptualLoss(weights_path, depth=depth, state_dict_key=state_dict_key or "state_dict")
    from monai.losses import PerceptualLoss

    _load_state_dict(weights_path, state_dict_key)  # readable? (clear error before torchvision's)
    return PerceptualLoss(
        spatial_dims=3, network_type="resnet50", is_fake_3d=True, fake_3d_ratio=fake_3d_ratio,
        pretrained=True, pretrained_path=str(weights_path), pretrained_state_dict_key=state_dict_key,
    )
