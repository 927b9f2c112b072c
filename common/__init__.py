"""Shared code of the brain-tumor MRI synthesis bundles: data, preprocessing, phantoms, engines, metrics."""

__version__ = "0.1.0"

CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
"""Canonical contrast keys (BraTS 2023 names) used by every datalist and bundle."""

from common import errors as _errors  # noqa: E402

_errors.install()  # user mistakes print as one clear line, from every entry point (see common.errors)
