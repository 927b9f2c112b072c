"""LDM-3D (Truong et al., SPIE 2024): mask-conditioned 3D multi-contrast latent diffusion. The bundle is
``bundles/brats_mri_ldm3d``; this module holds the paper's network, its demo and its benchmark suites."""

from common.ldm3d.networks import MaskConditionedLDM, build_ldm

__all__ = ["MaskConditionedLDM", "build_ldm"]
