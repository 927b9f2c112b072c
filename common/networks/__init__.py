"""Networks MONAI lacks for mask-conditioned generation; everything else is MONAI core."""

from common.networks.ldm import MaskConditionedLDM, MaskConditioner, build_autoencoder, build_ldm, build_unet
from common.networks.perceptual import build_perceptual_loss
from common.networks.sampling import MaskConditionedSampler, make_sampling_scheduler

__all__ = [
    "MaskConditioner",
    "MaskConditionedLDM",
    "MaskConditionedSampler",
    "build_autoencoder",
    "build_ldm",
    "build_perceptual_loss",
    "build_unet",
    "make_sampling_scheduler",
]
