"""Label schemes of the brain-tumor datasets and loss-aware conversions between them.

Every scheme maps integer label values to *canonical compartments*; converting goes value -> compartment ->
value, so any scheme converts to any other through one table.

Canonical compartments:
    ``background``  not tumor (0 in every scheme)
    ``head``        head/brain tissue outside the tumor (only GliomaGen's ``six_label``; it is derived from the
                    image, see ``common.data.transforms.AddHeadLabeld``)
    ``NETC``        non-enhancing tumor core / necrosis (BraTS <= 2021 "NCR/NET")
    ``SNFH``        surrounding non-enhancing FLAIR hyperintensity (BraTS <= 2021 "ED", MSD "edema")
    ``ET``          enhancing tumor
    ``RC``          resection cavity (BraTS 2024 post-treatment)

Lossy conversions (what happens):
    * ``head`` -> a scheme without ``head``: becomes background, always (it is not tumor tissue and can be
      recomputed from the image).
    * any tumor compartment (in practice ``RC``) -> a scheme without it: raises ``DataError`` by default; with
      ``lossy="background"`` those voxels become background (0) -- the BraTS 2023 reading of a cavity.

Regions (BraTS definitions; BraTS 2024 post-treatment for ``RC``):
    ``ET`` = ET;  ``TC`` = ET + NETC;  ``WT`` = ET + NETC + SNFH.
    The resection cavity is *not* tumor: it is excluded from TC and WT (as in the BraTS 2024 evaluation) and
    reported as its own ``RC`` region for schemes that have it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from common.io import DataError

COMPARTMENTS = ("background", "head", "NETC", "SNFH", "ET", "RC")
TUMOR_COMPARTMENTS = ("NETC", "SNFH", "ET")
REGION_COMPARTMENTS = {"ET": ("ET",), "TC": ("ET", "NETC"), "WT": ("ET", "NETC", "SNFH")}
LOSSY_POLICIES = ("error", "background")


@dataclass(frozen=True)
class LabelScheme:
    """A dataset's label convention: label value -> canonical compartment."""

    name: str
    values: Mapping[int, str]
    description: str = ""
    value_of: Mapping[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        unknown = set(self.values.values()) - set(COMPARTMENTS)
        if unknown:
            raise ValueError(f"label scheme {self.name!r}: unknown compartments {sorted(unknown)}")
        if self.values.get(0) != "background":
            raise ValueError(f"label scheme {self.name!r}: value 0 must be background")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "value_of", MappingProxyType({c: v for v, c in self.values.items()}))

    @property
    def compartments(self) -> tuple[str, ...]:
        return tuple(self.values.values())

    @property
    def max_value(self) -> int:
        return max(self.values)

    @property
    def num_classes(self) -> int:
        """Number of one-hot channels (``max_value + 1``; gaps such as BraTS 2019's value 3 stay empty)."""
        return self.max_value + 1

    def has(self, compartment: str) -> bool:
        return compartment in self.value_of


SCHEMES: dict[str, LabelScheme] = {
    s.name: s
    for s in (
        LabelScheme(
            "brats2019",
            {0: "background", 1: "NETC", 2: "SNFH", 4: "ET"},
            "BraTS 2017-2021: 1 NCR/NET, 2 ED, 4 ET (value 3 unused)",
        ),
        LabelScheme("brats2023", {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}, "BraTS 2023: 1 NETC, 2 SNFH, 3 ET"),
        LabelScheme(
            "brats2024",
            {0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
            "BraTS 2024 post-treatment: 1 NETC, 2 SNFH, 3 ET, 4 RC",
        ),
        LabelScheme(
            "msd",
            {0: "background", 1: "SNFH", 2: "NETC", 3: "ET"},
            "MSD Task01_BrainTumour: 1 edema, 2 non-enhancing tumor, 3 enhancing tumour",
        ),
        LabelScheme(
            "six_label",
            {0: "background", 1: "head", 2: "NETC", 3: "SNFH", 4: "ET", 5: "RC"},
            "GliomaGen: 1 head (added), 2 NETC, 3 SNFH, 4 ET, 5 RC",
        ),
    )
}
# BraTS 2020 and 2021 kept the 2017 convention.
SCHEME_ALIASES = {f"brats{year}": "brats2019" for year in (2017, 2018, 2020, 2021)}


def get_scheme(scheme: str | LabelScheme) -> LabelScheme:
    """Look a scheme up by name (``brats2019`` .. ``brats2024``, ``msd``, ``six_label``); objects pass through."""
    if isinstance(scheme, LabelScheme):
        return scheme
    key = str(scheme).lower()
    key = SCHEME_ALIASES.get(key, key)
    if key not in SCHEMES:
        raise DataError("--label_scheme", f"unknown label scheme {scheme!r}; choose one of {', '.join(sorted(SCHEMES) + sorted(SCHEME_ALIASES))}")
    return SCHEMES[key]


def _present_values(array: np.ndarray, where: Any) -> np.ndarray:
    """Distinct label values; non-integer or non-finite values are an error (a resampled or wrong file)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(where, "label contains NaN/Inf")
        values = np.unique(array)
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise DataError(
                where,
                f"label has non-integer values (e.g. {fractional[:3].tolist()}); was it resampled with a "
                "non-nearest interpolation?",
            )
        return values.astype(np.int64)
    return np.unique(array).astype(np.int64)


def check_labels(array: Any, scheme: str | LabelScheme, where: Any = "label") -> np.ndarray:
    """Raise ``DataError`` if ``array`` holds values outside ``scheme``; return the distinct values present."""
    scheme = get_scheme(scheme)
    values = _present_values(np.asarray(array), where)
    bad = sorted(set(values.tolist()) - set(scheme.values))
    if len(bad) > 8:  # hundreds of distinct values: an intensity image, not a label mask
        raise DataError(where, f"{len(bad)} label values outside scheme {scheme.name!r} (from {bad[0]} to {bad[-1]}; "
                               f"allowed {sorted(scheme.values)}): this looks like an image, not a label mask")
    if bad:
        hint = ""
        if scheme.name == "brats2023" and 4 in bad:
            hint = " (value 4 is the resection cavity of BraTS 2024: use the brats2024 scheme/layout)"
        elif scheme.name in ("brats2023", "brats2024") and 4 in bad and 3 not in values:
            hint = " (4 without 3 looks like BraTS 2017-2021 ET: use the brats2019 scheme)"
        raise DataError(
            where, f"label values {bad} are not in scheme {scheme.name!r} (allowed {sorted(scheme.values)}){hint}"
        )
    return values


def conversion_table(src: str | LabelScheme, dst: str | LabelScheme, lossy: str = "error") -> dict[int, int]:
    """Value map ``src -> dst``; compartments ``dst`` lacks map to -1 (lossy) unless ``lossy="background"``."""
    src, dst = get_scheme(src), get_scheme(dst)
    if lossy not in LOSSY_POLICIES:
        raise ValueError(f"lossy must be one of {LOSSY_POLICIES}, got {lossy!r}")
    table = {}
    for value, compartment in src.values.items():
        if dst.has(compartment):
            table[value] = dst.value_of[compartment]
        elif compartment == "head" or lossy == "background":
            table[value] = 0
        else:
            table[value] = -1
    return table


def convert_labels(
    array: Any, src: str | LabelScheme, dst: str | LabelScheme, lossy: str = "error", where: Any = "label"
) -> np.ndarray:
    """Convert a label volume between schemes (uint8 result).

    Raises ``DataError`` (naming ``where``) for values outside ``src`` and, with ``lossy="error"``, for voxels of a
    compartment ``dst`` cannot represent (e.g. a resection cavity into ``brats2023``). ``lossy="background"``
    turns those voxels into background. ``head`` always becomes background in schemes without it.
    """
    src_s, dst_s = get_scheme(src), get_scheme(dst)
    array = np.asarray(array)
    present = check_labels(array, src_s, where)
    table = conversion_table(src_s, dst_s, lossy)
    lost = [v for v in present.tolist() if table[v] < 0]
    if lost:
        names = [src_s.values[v] for v in lost]
        raise DataError(
            where,
            f"converting {src_s.name} -> {dst_s.name} would lose {names} (values {lost}): {dst_s.name} has no such "
            "label; pass lossy='background' to turn them into background",
        )
    if src_s.name == dst_s.name:
        return array.astype(np.uint8)
    lut = np.zeros(src_s.max_value + 1, dtype=np.uint8)
    for v, w in table.items():
        lut[v] = max(w, 0)
    return lut[array.astype(np.int64)]


def compartment_mask(array: Any, scheme: str | LabelScheme, compartments) -> np.ndarray:
    """Boolean mask of the voxels whose label belongs to any of ``compartments`` (absent ones are ignored)."""
    scheme = get_scheme(scheme)
    array = np.asarray(array)
    values = [scheme.value_of[c] for c in compartments if scheme.has(c)]
    return np.isin(array, values) if values else np.zeros(array.shape, dtype=bool)


def tumor_mask(array: Any, scheme: str | LabelScheme, include_rc: bool = False) -> np.ndarray:
    """Whole tumor (NETC+SNFH+ET), optionally with the resection cavity; never the ``head`` label."""
    return compartment_mask(array, scheme, TUMOR_COMPARTMENTS + (("RC",) if include_rc else ()))


def regions(array: Any, scheme: str | LabelScheme) -> dict[str, np.ndarray]:
    """BraTS evaluation regions as boolean arrays: ``ET``, ``TC``, ``WT`` (+ ``RC`` if the scheme has it)."""
    scheme = get_scheme(scheme)
    array = np.asarray(array)
    out = {name: compartment_mask(array, scheme, comps) for name, comps in REGION_COMPARTMENTS.items()}
    if scheme.has("RC"):
        out["RC"] = compartment_mask(array, scheme, ("RC",))
    return out


def region_channels(array: Any, scheme: str | LabelScheme, names=("TC", "WT", "ET")) -> np.ndarray:
    """Stack regions to a multi-channel float array (MONAI's ConvertToMultiChannelBasedOnBratsClasses order)."""
    reg = regions(array, scheme)
    return np.stack([reg[n] for n in names]).astype(np.float32)
