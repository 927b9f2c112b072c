"""One evaluation suite for every bundle: image quality, paired similarity, memorisation, downstream tasks.

Array functions (usable in validation loops without files) and ``evaluate_sets`` (files -> report).
"""

from common.metrics.classification import classification_scores
from common.metrics.distribution import (
    MMDSums,
    fid_report,
    frechet_distance,
    image_mmd,
    kernel_inception_distance,
    kid_report,
    metric_vs_count,
    mmd2_unbiased,
    mmd_from_sums,
    subsample_interval,
)
from common.metrics.evaluate import (EvalConfig, evaluate_segmentations, evaluate_sets, evaluate_shard, load_items,
                                     load_volume, merge_shards)
from common.metrics.features import (
    SliceFeatureExtractor,
    VolumeFeatureExtractor,
    build_extractor,
    extract_features,
    find_weights,
)
from common.metrics.memorisation import nearest_neighbours
from common.metrics.segmentation import (
    binary_scores,
    cohen_kappa,
    conditioning_fidelity,
    mean_scores,
    region_values,
    segmentation_scores,
)
from common.metrics.similarity import (
    MS_SSIM_OPTIONS,
    SSIM_OPTIONS,
    mae,
    ms_ssim,
    ms_ssim_diversity,
    ms_ssim_fidelity,
    ms_ssim_option,
    ms_ssim_settings,
    normalised_paired_scores,
    paired_scores,
    percentile_normalise,
    psnr,
    ssim,
    ssim_option,
    ssim_regions,
)

__all__ = [
    "EvalConfig", "evaluate_sets", "evaluate_shard", "merge_shards", "evaluate_segmentations", "load_items",
    "load_volume",
    "SliceFeatureExtractor", "VolumeFeatureExtractor", "build_extractor", "extract_features", "find_weights",
    "frechet_distance", "kernel_inception_distance", "mmd2_unbiased", "image_mmd", "MMDSums", "mmd_from_sums", "subsample_interval",
    "fid_report", "kid_report", "metric_vs_count",
    "ssim", "psnr", "mae", "ms_ssim", "ms_ssim_settings", "ms_ssim_fidelity", "ms_ssim_diversity",
    "SSIM_OPTIONS", "MS_SSIM_OPTIONS", "ssim_option", "ms_ssim_option", "ssim_regions", "normalised_paired_scores",
    "paired_scores", "percentile_normalise",
    "binary_scores", "segmentation_scores", "cohen_kappa", "mean_scores", "region_values", "conditioning_fidelity",
    "classification_scores", "nearest_neighbours",
]
