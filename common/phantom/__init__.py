"""Physics-based brain-tumour MRI phantoms: embedded default data for every bundle, test, demo and benchmark.

Anatomy from the MNI152 2009 templates shipped with nilearn (plus CSF and a head built around the brain),
1-3 gliomas with BraTS compartments and mass effect, and the four BraTS contrasts from MR signal equations
with 3 T relaxation times, bias field and Rician noise. See ``generate_case`` and ``make_phantoms``.
"""

from .core import (
    DEFAULT_SHAPE,
    LABELS,
    SMALL_SHAPE,
    PhantomCase,
    case_seed,
    default_grade,
    generate_case,
    make_phantoms,
)
from .mri import TISSUE_NAMES, TISSUES
from .tumor import GRADES

__all__ = [
    "DEFAULT_SHAPE",
    "GRADES",
    "LABELS",
    "SMALL_SHAPE",
    "TISSUES",
    "TISSUE_NAMES",
    "PhantomCase",
    "case_seed",
    "default_grade",
    "generate_case",
    "make_phantoms",
]
