"""Bundle-side helpers every bundle reuses: data resolution (phantoms made on first use), mask checks for
inference, outputs written on the mask's grid (BraTS names + montage), weight loading."""

from common.bundle.generate import generate
from common.bundle.prepare import prepare_cases
from common.bundle.run import run_bundle
from common.bundle.data import phantom_datalist, resolve_datalist, training_items
from common.bundle.masks import collect_masks, load_mask
from common.bundle.outputs import load_weights, save_generated

__all__ = [
    "collect_masks",
    "generate",
    "load_mask",
    "load_weights",
    "phantom_datalist",
    "prepare_cases",
    "resolve_datalist",
    "run_bundle",
    "save_generated",
    "training_items",
]
