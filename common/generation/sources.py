"""Condition sources: tumor masks found (file / folder / datalist) and checked before anything is generated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.io import DataError, load_nifti

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _case_id(path: Path) -> str:
    name = _stem(path)
    for tail in ("-seg", "_seg", "-label", "_label", "-mask", "_mask"):
        if name.endswith(tail):
            return name[: -len(tail)]
    return name


def collect_masks(source: str | os.PathLike, section: str | Sequence[str] = ("validation",)) -> list[tuple[str, Path]]:
    """(case id, mask path) for a mask NIfTI, a folder of them, or a datalist JSON (its ``label`` entries)."""
    source = Path(source)
    if not source.exists():
        raise DataError(source, "mask input does not exist (give a mask NIfTI, a folder of masks or a datalist JSON)")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise DataError(source, "folder holds no .nii/.nii.gz mask")
        # a case folder holds images too: take the label files when there are any
        labelled = [p for p in files if _case_id(p) != _stem(p)]
        return [(_case_id(p), p) for p in (labelled or files)]
    if source.name.endswith(".json"):
        from common.data.datalist import load_datalist

        items = load_datalist(source, section)
        masks = [(str(it.get("id") or _case_id(Path(it["label"]))), Path(it["label"])) for it in items if it.get("label")]
        if not masks:
            raise DataError(source, f"no 'label' entries in section(s) {section}")
        return masks
    if source.name.endswith(NIFTI_SUFFIXES):
        return [(_case_id(source), source)]
    raise DataError(source, "not a NIfTI (.nii/.nii.gz), a folder or a datalist (.json)")


def load_mask(
    path: str | os.PathLike,
    shape: Sequence[int] | None = None,
    scheme: str = "brats2023",
    to_scheme: str | None = None,
    require_tumor: bool = True,
):
    """Read and check a tumor mask -> (uint8 labels, affine, header). Raises DataError naming the file for:
    unreadable/empty files, non-3D data, non-integer values, labels outside ``scheme``, no tumor voxel, or a grid
    other than ``shape`` (the generator's grid: outputs are written on the mask's grid)."""
    from common.data.labels import check_labels, convert_labels

    path = Path(path)
    data, affine, header = load_nifti(path, dtype=None)
    data = np.asarray(data)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"mask must be a 3D label volume, got shape {tuple(data.shape)}")
    if shape is not None and tuple(data.shape) != tuple(int(s) for s in shape):
        raise DataError(
            path, f"mask grid {tuple(data.shape)} does not match the model's grid {tuple(int(s) for s in shape)}"
        )
    values = check_labels(data, scheme, where=path)  # also refuses NaN and non-integer values
    if require_tumor and not np.any(values > 0):
        raise DataError(path, "mask is empty (no tumor voxel): nothing to condition on")
    labels = data.astype(np.uint8)
    if to_scheme and to_scheme != scheme:
        labels = convert_labels(labels, scheme, to_scheme, lossy="background", where=path)
    return labels, affine, header


class MaskSource:
    """Tumor masks as conditions: a mask NIfTI, a folder of masks or a datalist JSON (``label`` entries of
    ``section``). Every mask is read and checked on first use (``len``), before the first sample is drawn, so a
    bad input stops the run with a clear error and no output at all.

    ``label_scheme``: the masks' label convention (default: the datalist's, else brats2023); masks are converted
    to ``condition_scheme`` (what the network was trained on). ``spatial_size``: the model grid (masks must be on it
    unless ``chain`` is given).
    ``validate``: a method's own check of a converted mask, ``labels -> [problems]`` (empty: valid).
    ``chain``: the bundle's deterministic mask chain (``{"label": MetaTensor} -> {"label": ...}`` on the
    model grid, its affine tracked by MONAI). With it a mask may be on any grid -- a BraTS mask in scanner space --
    and each item keeps its own grid under ``input_grid`` so a writer can map the outputs back onto it; without
    it masks must already be on ``spatial_size``.
    """

    def __init__(
        self,
        input: str | os.PathLike,
        spatial_size: Sequence[int] | None = None,
        label_scheme: str | None = None,
        condition_scheme: str = "brats2023",
        section: str | Sequence[str] = ("validation",),
        validate: Callable[[np.ndarray], list[str]] | None = None,
        chain: Callable[[dict], dict] | None = None,
    ):
        # read on first use (len or iteration): a workflow can be built, and its properties checked, before
        # the user has said which masks to generate from
        self.input, self.spatial_size, self.section = input, spatial_size, section
        self.label_scheme, self.condition_scheme = label_scheme, condition_scheme
        self.validate, self.chain = validate, chain
        self._items: list[dict] | None = None

    @property
    def items(self) -> list[dict]:
        if self._items is None:
            self._items = self._load()
        return self._items

    def _load(self) -> list[dict]:
        source = Path(str(self.input))
        if not str(self.input) or str(self.input) == ".":
            raise DataError("input", "no mask input given: set --input to a mask NIfTI, a folder of masks or a "
                                     "datalist JSON")
        if self.label_scheme is None:
            self.label_scheme = "brats2023"
            if source.name.endswith(".json") and source.is_file():
                from common.data.datalist import datalist_info

                self.label_scheme = datalist_info(source).get("label_scheme", "brats2023")
        masks = collect_masks(source, self.section)
        seen: dict[str, Path] = {}
        for case_id, path in masks:
            if case_id in seen:
                raise DataError(path, f"gives the same case id {case_id!r} as {seen[case_id]}: their outputs would "
                                      "overwrite each other; rename one of them")
            seen[case_id] = path
        items = []
        for case_id, path in masks:
            labels, affine, header = load_mask(path, None if self.chain else self.spatial_size, self.label_scheme,
                                               to_scheme=self.condition_scheme)
            item = {"id": case_id, "path": str(path), "labels": labels, "affine": affine, "header": header}
            if self.chain is not None:
                item = self._to_model_grid(item)
            problems = self.validate(item["labels"]) if self.validate is not None else []
            if problems:
                raise DataError(path, "; ".join(problems))
            items.append(item)
        return items

    def _to_model_grid(self, item: dict) -> dict:
        import torch
        from monai.data import MetaTensor

        label = MetaTensor(torch.as_tensor(item["labels"][None].astype(np.float32)),
                           affine=torch.as_tensor(np.asarray(item["affine"], dtype=np.float64)))
        moved = self.chain({"label": label})["label"]
        labels = np.rint(np.asarray(moved.detach().cpu())[0]).astype(np.uint8)
        if self.spatial_size is not None and tuple(labels.shape) != tuple(int(s) for s in self.spatial_size):
            raise DataError(item["path"], f"the bundle's mask chain gave grid {tuple(labels.shape)}, the model needs "
                                          f"{tuple(int(s) for s in self.spatial_size)}")
        if not np.any(labels > 0):
            raise DataError(item["path"], "no tumor voxel is left on the model grid (the tumor is outside the part "
                                          "of the volume the bundle's chain keeps)")
        grid = {"shape": tuple(item["labels"].shape), "affine": np.asarray(item["affine"]), "header": item["header"],
                "labels": item["labels"]}
        return {**item, "labels": labels, "affine": np.asarray(moved.affine, dtype=np.float64), "header": None,
                "input_grid": grid}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        import torch

        for item in self.items:
            yield item, torch.as_tensor(item["labels"].astype(np.float32))[None, None]
