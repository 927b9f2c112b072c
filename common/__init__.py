"""Shared code of the brain-tumor MRI synthesis bundles: data, preprocessing, phantoms, engines, metrics."""

__version__ = "0.1.0"

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
"""Canonical contrast keys (BraTS 2023 names) used by every datalist and bundle."""
