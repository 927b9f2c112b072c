"""Tensor kernels with no project imports (the bottom layer, beside ``io`` and ``viz``)."""

from common.ops.ssim import crop_valid, gaussian_window, ms_ssim, ms_ssim_min_size, ssim, ssim_map

__all__ = ["ssim", "ssim_map", "ms_ssim", "crop_valid", "gaussian_window", "ms_ssim_min_size"]
