"""Pluggable feature extractors for FID/KID: 2D Inception on slices, 2.5D RadImageNet, 3D MedicalNet.

Every extractor maps one 3D volume to a matrix of feature rows (one row per slice for the slice-based
extractors, one row per volume for the 3D one), so a distance over feature rows can be bootstrapped over
*volumes*. Published weights are never downloaded here: they are read from a local file or from the torch
hub cache; when absent the error says which file to put where. Tests plug a small network into the same
slice/volume code path (``SliceFeatureExtractor`` / ``VolumeFeatureExtractor``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.io import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Published weight files: name -> (file name, where it is published). The file is looked up (in order) at the
# path given by the user, then in torch.hub.get_dir()/checkpoints/<file name>.
PUBLISHED_WEIGHTS = {
    "inception2d": (
        "inception_v3_google-0cc3c7bd.pth",
        "torchvision Inception_V3_Weights.IMAGENET1K_V1: https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    ),
    "radimagenet2.5d": (
        "RadImageNet-ResNet50.pt",
        "RadImageNet PyTorch ResNet-50 backbone (https://github.com/BMEII-AI/RadImageNet, torchvision resnet50 layout; "
        "keys may carry 'module.'/'backbone.' prefixes or nn.Sequential indices)",
    ),
    "medicalnet3d": (
        "resnet_{depth}_23dataset.pth",
        "MedicalNet (Tencent) https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}/resnet_{depth}_23dataset.pth",
    ),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_weights(name: str, weights: str | os.PathLike | None = None, depth: int = 50) -> Path:
    """Locate the published weight file of extractor ``name`` or fail saying which file to put where."""
    file_name, origin = (s.format(depth=depth) for s in PUBLISHED_WEIGHTS[name])
    candidates = []
    if weights is not None:
        candidates.append(Path(weights).expanduser())
    hub_dir = Path(torch.hub.get_dir())
    candidates.append(hub_dir / "checkpoints" / file_name)
    if name == "medicalnet3d":  # MONAI's get_pretrained_resnet_medicalnet stores files through huggingface_hub
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(f"TencentMedicalNet/MedicalNet-Resnet{depth}", file_name)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # huggingface_hub absent or cache unreadable: only the local paths count
            pass
    for path in candidates:
        if path.is_file():
            return path
    tried = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"weights for feature extractor {name!r} not found. Put the file {file_name!r} ({origin}) at\n"
        f"  {hub_dir / 'checkpoints' / file_name}\nor pass its path with --weights. Looked at:\n  {tried}"
    )


def load_state_dict_file(network: nn.Module, path: str | os.PathLike, rename: Callable[[str], str] | None = None):
    """Load a state dict (``weights_only=True``) into ``network``; classifier heads absent from it are allowed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(path, f"cannot load weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(path, f"expected a state dict, found {type(state).__name__}")
    state = {(rename(k) if rename else k): v for k, v in state.items()}
    own = network.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    if unexpected or missing:
        raise DataError(
            path,
            f"weights do not fit {type(network).__name__}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise DataError(path, f"weight shapes do not fit the network: {bad[:3]}")
    network.load_state_dict(state, strict=False)
    return network


def scale_to_unit(volume: torch.Tensor, percentiles: tuple[float, float] = (0.5, 99.5)) -> torch.Tensor:
    """Clip to brain-voxel percentiles and scale to [0, 1] so every extractor sees comparable intensities."""
    nonzero = volume[volume != 0]
    if nonzero.numel() == 0:
        return torch.zeros_like(volume)
    lo, hi = torch.quantile(nonzero.float()[:: max(1, nonzero.numel() // 1_000_000)], torch.tensor(percentiles) / 100)
    if hi <= lo:
        hi = lo + 1
    return ((volume - lo) / (hi - lo)).clamp(0, 1)


class SliceFeatureExtractor:
    """Runs a 2D network on the slices of a volume (one or three planes); one feature row per slice.

    Slices with no brain (all zero) are skipped; ``stride`` keeps every n-th slice to bound the cost.
    """

    def __init__(
        self,
        network: nn.Module,
        planes: Sequence[str] = ("axial",),
        input_size: int | None = 299,
        in_channels: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        stride: int = 1,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        name: str = "custom2d",
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.network = network.to(self.device).eval()
        self.planes = tuple(planes)
        self.input_size = input_size
        self.in_channels = in_channels
        self.mean = torch.tensor(mean[:in_channels], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std[:in_channels], dtype=torch.float32).view(1, -1, 1, 1)
        self.stride = max(1, int(stride))
        self.batch_size = batch_size
        self.name = name

    _AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

    def slices(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """Non-empty slices of each chosen plane, (N, 1, H, W) per plane, resized to ``input_size`` if set."""
        out = []
        for plane in self.planes:
            stack = volume.movedim(self._AXIS[plane], 0)[:: self.stride]
            stack = stack[stack.flatten(1).abs().amax(1) > 0].unsqueeze(1)
            if stack.shape[0] == 0:
                continue
            if self.input_size is not None:
                stack = F.interpolate(stack, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
            out.append(stack)
        return out

    @torch.no_grad()
    def __call__(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        vol = scale_to_unit(torch.as_tensor(np.asarray(volume), dtype=torch.float32))
        rows = []
        for stack in self.slices(vol):
            for start in range(0, stack.shape[0], self.batch_size):
                batch = stack[start : start + self.batch_size].repeat(1, self.in_channels, 1, 1)
                batch = ((batch - self.mean) / self.std).to(self.device)
                rows.append(_pool(self.network(batch)).float().cpu())
        if not rows:
            raise ValueError("volume has no non-zero slice to extract features from")
        return torch.cat(rows)


class VolumeFeatureExtractor:
    """Runs a 3D network on the whole volume (z-scored on brain voxels, MedicalNet's convention); one row."""

    def __init__(
        self,
        network: nn.Module,
        input_size: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        name: str = "custom3d",
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.network = network.to(self.device).eval()
        self.input_size = tuple(input_size) if input_size is not None else None
        self.name = name

    @torch.no_grad()
    def __call__(self, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
        vol = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
        brain = vol[vol != 0]
        if brain.numel() > 1:
            vol = torch.where(vol != 0, (vol - brain.mean()) / brain.std().clamp_min(1e-6), torch.zeros_like(vol))
        vol = vol[None, None]
        if self.input_size is not None:
            vol = F.interpolate(vol, size=self.input_size, mode="trilinear", align_corners=False)
        return _pool(self.network(vol.to(self.device))).float().cpu()


def _pool(features: torch.Tensor | tuple) -> torch.Tensor:
    """Global-average-pool whatever spatial dimensions a network leaves -> (N, C)."""
    if isinstance(features, (tuple, list)):
        features = features[0]
    if hasattr(features, "logits") and not isinstance(features, torch.Tensor):
        features = features.logits
    return features.flatten(2).mean(2) if features.ndim > 2 else features


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "backbone.", "model."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


_SEQUENTIAL_RESNET = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _radimagenet_key(key: str) -> str:
    """RadImageNet's PyTorch backbone is ``nn.Sequential(*resnet50.children()[:-1])``: map indices to names."""
    key = _strip_prefixes(key)
    head, _, rest = key.partition(".")
    return f"{_SEQUENTIAL_RESNET[head]}.{rest}" if head in _SEQUENTIAL_RESNET else key


def inception2d(weights=None, device=None, stride: int = 1, batch_size: int = 32) -> SliceFeatureExtractor:
    """torchvision ImageNet Inception-v3 on every non-empty axial slice, 2048-d pool features (GliomaGen, Zhou).

    Not the TF-Inception of pytorch-fid: numbers compare with other runs of this code, not across papers.
    """
    from torchvision.models import inception_v3

    path = find_weights("inception2d", weights)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    load_state_dict_file(net, path)
    net.aux_logits, net.AuxLogits, net.fc = False, None, nn.Identity()
    return SliceFeatureExtractor(net, ("axial",), 299, 3, stride=stride, batch_size=batch_size, device=device, name="inception2d")


def radimagenet25d(weights=None, device=None, stride: int = 1, batch_size: int = 32) -> SliceFeatureExtractor:
    """RadImageNet ResNet-50 on slices of the three planes (2.5D, as in MAISI), 2048-d pooled features."""
    from torchvision.models import resnet50

    path = find_weights("radimagenet2.5d", weights)
    net = resnet50(weights=None)
    load_state_dict_file(net, path, rename=_radimagenet_key)
    net.fc = nn.Identity()
    return SliceFeatureExtractor(
        net, ("axial", "coronal", "sagittal"), 224, 3, stride=stride, batch_size=batch_size, device=device,
        name="radimagenet2.5d",
    )


def medicalnet3d(weights=None, device=None, depth: int = 50, input_size: Sequence[int] | None = None) -> VolumeFeatureExtractor:
    """MedicalNet (Med3D) 3D ResNet from MONAI with its published 23-dataset weights; pooled last-block features."""
    from monai.networks.nets import resnet

    path = find_weights("medicalnet3d", weights, depth=depth)
    bias_downsample, shortcut_type = resnet.get_medicalnet_pretrained_resnet_args(depth)
    net = getattr(resnet, f"resnet{depth}")(
        pretrained=False, spatial_dims=3, n_input_channels=1, feed_forward=False,
        shortcut_type=shortcut_type, bias_downsample=bias_downsample,
    )
    load_state_dict_file(net, path, rename=_strip_prefixes)
    return VolumeFeatureExtractor(net, input_size=input_size, device=device, name=f"medicalnet3d-resnet{depth}")


def torchscript_extractor(path, mode: str = "3d", device=None, input_size=None, **kwargs):
    """Any TorchScript feature network saved by the user (``torch.jit.save``); ``mode``: 2d, 2.5d or 3d."""
    path = Path(path)
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise DataError(path, f"cannot load TorchScript feature network ({type(exc).__name__}: {exc})") from exc
    if mode == "3d":
        return VolumeFeatureExtractor(net, input_size=input_size, device=device, name=f"torchscript3d:{path.name}")
    planes = ("axial",) if mode == "2d" else ("axial", "coronal", "sagittal")
    return SliceFeatureExtractor(net, planes, input_size, device=device, name=f"torchscript{mode}:{path.name}", **kwargs)


EXTRACTORS = {"inception2d": inception2d, "radimagenet2.5d": radimagenet25d, "medicalnet3d": medicalnet3d}


def build_extractor(name: str, weights=None, device=None, **kwargs):
    """``name`` is one of EXTRACTORS, or a path to a TorchScript feature network (then ``mode`` in kwargs)."""
    if name in EXTRACTORS:
        return EXTRACTORS[name](weights=weights, device=device, **kwargs)
    if Path(name).suffix in (".ts", ".pt", ".pth", ".jit") or Path(name).exists():
        return torchscript_extractor(name, device=device, **kwargs)
    raise ValueError(f"unknown feature extractor {name!r}: choose one of {sorted(EXTRACTORS)} or a TorchScript file")


def extract_features(extractor, volumes, progress: bool = True, desc: str = "features") -> list[torch.Tensor]:
    """One feature matrix per volume (volumes: arrays or zero-argument loaders), with a progress bar."""
    from tqdm.auto import tqdm

    out = []
    for vol in tqdm(volumes, desc=desc, disable=not progress, leave=False):
        out.append(extractor(vol() if callable(vol) else vol))
    return out
