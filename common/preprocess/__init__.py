"""FeTS/BraTS-style preprocessing of raw multi-contrast brain MRI (see ``pipeline`` for the recipe)."""

from common.preprocess.atlas import Atlas, load_atlas
from common.preprocess.pipeline import PreprocessConfig, PreprocessResult, preprocess_case
from common.preprocess.runner import RunSummary, parse_shard, preprocess_dataset, select_shard
from common.preprocess.skullstrip import HDBetUnavailable, hdbet_status, resolve_method

__all__ = [
    "Atlas",
    "HDBetUnavailable",
    "PreprocessConfig",
    "PreprocessResult",
    "RunSummary",
    "hdbet_status",
    "load_atlas",
    "parse_shard",
    "preprocess_case",
    "preprocess_dataset",
    "resolve_method",
    "select_shard",
]
