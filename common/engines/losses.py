"""Named, weighted loss terms for :class:`common.engines.AdversarialTrainer`.

A config lists the terms of a method by name, so the paper's objective reads at a glance and each term is logged
on its own::

    "losses": {"l1": {"_target_": "common.engines.losses.L1", "weight": 1.0},
               "kl": {"_target_": "common.engines.losses.KL", "weight": 1e-7},
               "lesion": {"_target_": "common.engines.losses.MaskedL1", "weight": 100.0, "mask_key": "label"}}

A term is called as ``term(pred, target, outputs, batch)``: ``pred`` the generator's image, ``target`` the image
it should match, ``outputs`` every generator output by name (``z_mu``/``z_sigma`` of a KL autoencoder,
``quantization_loss`` of a VQ-VAE, ``class_logits``...), ``batch`` the batch dict (masks, labels). It returns the
unweighted scalar; the trainer multiplies by ``weight`` and skips terms whose weight is 0.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["LossTerm", "L1", "MaskedL1", "KL", "Quantization", "Perceptual", "SSIM", "CrossEntropy", "kl_divergence"]


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(1).mean()


def _output(outputs: dict, key: str, term: str) -> torch.Tensor:
    if key not in outputs:
        raise KeyError(f"loss term {term}: the generator gave no '{key}' output (it gave {sorted(outputs)})")
    return outputs[key]


class LossTerm(nn.Module):
    """Base class: ``weight`` and ``value(pred, target, outputs, batch) -> scalar``."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    @property
    def active(self) -> bool:
        return self.weight != 0.0

    def value(self, pred: torch.Tensor, target: torch.Tensor, outputs: dict, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, pred, target, outputs, batch) -> torch.Tensor:
        return self.value(pred, target, outputs, batch)


class L1(LossTerm):
    """Mean absolute error over every voxel."""

    def value(self, pred, target, outputs, batch):
        return (pred.float() - target.float()).abs().mean()


class MaskedL1(LossTerm):
    """Mean absolute error between the masked target and the masked prediction (Genc et al.'s lesion-mask loss):
    errors inside the mask (``batch[mask_key] > threshold``, e.g. the tumor) are counted again, so they cost more.

    ``normalise="image"`` divides by every voxel (the masked images compared as images); ``"mask"`` by the mask's
    voxels (the in-lesion MAE, whatever the lesion size).
    """

    def __init__(self, weight: float = 1.0, mask_key: str = "label", threshold: float = 0.0, normalise: str = "image"):
        super().__init__(weight)
        if normalise not in ("image", "mask"):
            raise ValueError(f"MaskedL1: normalise must be 'image' or 'mask', got {normalise!r}")
        self.mask_key, self.threshold, self.normalise = mask_key, float(threshold), normalise

    def value(self, pred, target, outputs, batch):
        if self.mask_key not in batch:
            raise KeyError(f"MaskedL1: the batch has no '{self.mask_key}' mask (it has {sorted(batch)})")
        mask = (torch.as_tensor(batch[self.mask_key]).to(pred.device) > self.threshold).float()
        if mask.shape[1] != 1:
            mask = mask.amax(1, keepdim=True)
        err = ((pred.float() - target.float()) * mask).abs()
        if self.normalise == "mask":
            return err.sum() / (mask.expand_as(err).sum().clamp_min(1.0))
        return err.mean()


class KL(LossTerm):
    """KL divergence of a KL autoencoder's posterior (``z_mu``, ``z_sigma`` outputs) to N(0, 1)."""

    def value(self, pred, target, outputs, batch):
        return kl_divergence(_output(outputs, "z_mu", "KL"), _output(outputs, "z_sigma", "KL"))


class Quantization(LossTerm):
    """A VQ-VAE's codebook/commitment loss (its ``quantization_loss`` output)."""

    def value(self, pred, target, outputs, batch):
        return _output(outputs, "quantization_loss", "Quantization").float().mean()


class Perceptual(LossTerm):
    """A perceptual loss network ``(pred, target) -> loss`` (e.g. :func:`common.networks.build_perceptual_loss`);
    inactive when the network is None (no local weights)."""

    def __init__(self, weight: float = 1.0, network: Callable | None = None):
        super().__init__(weight)
        self.network = network

    @property
    def active(self) -> bool:
        return self.weight != 0.0 and self.network is not None

    def value(self, pred, target, outputs, batch):
        return self.network(pred.float(), target.float()).float().mean()


class SSIM(LossTerm):
    """1 - SSIM (Gaussian window, data range of the target batch: z-scored MRI has no fixed range).

    The window shrinks to the smallest spatial size (odd) so tiny test volumes work."""

    def __init__(self, weight: float = 1.0, kernel_size: int = 11, sigma: float = 1.5):
        super().__init__(weight)
        self.kernel_size, self.sigma = int(kernel_size), float(sigma)

    def value(self, pred, target, outputs, batch):
        from common.ops.ssim import ssim

        k = min(self.kernel_size, min(pred.shape[2:]))
        k = k if k % 2 == 1 else k - 1
        data_range = (target.max() - target.min()).detach().clamp_min(1e-6)
        return 1.0 - ssim(pred.float(), target.float(), data_range=data_range, kernel_size=k, sigma=self.sigma)


class CrossEntropy(LossTerm):
    """Cross-entropy of a classifier output (``outputs[logits_key]``) against integer labels ``batch[label_key]``."""

    def __init__(self, weight: float = 1.0, logits_key: str = "class_logits", label_key: str = "class"):
        super().__init__(weight)
        self.logits_key, self.label_key = logits_key, label_key

    def value(self, pred, target, outputs: dict, batch: dict[str, Any]):
        if self.label_key not in batch:
            raise KeyError(f"CrossEntropy: the batch has no '{self.label_key}' labels (it has {sorted(batch)})")
        logits = _output(outputs, self.logits_key, "CrossEntropy").float()
        labels = torch.as_tensor(batch[self.label_key]).to(logits.device).long().view(-1)
        return nn.functional.cross_entropy(logits, labels)
