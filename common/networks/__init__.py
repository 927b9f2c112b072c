"""Generic building blocks (MONAI networks configured once, what MONAI lacks); method networks live in their
method module (``common.ldm3d``...)."""

from common.networks.builders import build_autoencoder, build_unet, one_hot_labels
from common.networks.perceptual import build_perceptual_loss

__all__ = ["build_autoencoder", "build_perceptual_loss", "build_unet", "one_hot_labels"]
