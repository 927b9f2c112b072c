"""Output writers: generated volumes on the condition's grid (its affine and header), BraTS file names, a montage
per sample, a manifest and a datalist of what was written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from common import CONTRASTS
from common.io import DataError, check_output, save_json, save_nifti


def save_generated(
    images: np.ndarray,
    affine: np.ndarray,
    header,
    out_dir: str | os.PathLike,
    case_id: str,
    mask: np.ndarray | None = None,
    contrasts: Sequence[str] = CONTRASTS,
    montage: bool = True,
    save_mask: bool = True,
) -> dict[str, Path]:
    """``images`` [C, H, W, D] -> ``out_dir/<case_id>/<case_id>-<contrast>.nii.gz`` (+ ``-seg`` copy of the mask and
    ``<case_id>.png`` montage with the mask outlined). Each file is written atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[0] != len(contrasts):
        raise ValueError(f"{images.shape[0]} generated channels for {len(contrasts)} contrasts {tuple(contrasts)}")
    folder = Path(out_dir) / case_id
    paths: dict[str, Path] = {}
    for contrast, volume in zip(contrasts, images):
        paths[contrast] = save_nifti(volume, affine, folder / f"{case_id}-{contrast}.nii.gz", header=header, dtype=np.float32)
    if mask is not None and save_mask:
        paths["seg"] = save_nifti(mask, affine, folder / f"{case_id}-seg.nii.gz", header=header, dtype=np.uint8)
    if montage:
        from common.viz import save_montage

        paths["montage"] = save_montage(
            dict(zip(contrasts, images)), folder / f"{case_id}.png", mask=mask, title=f"{case_id} (generated)", affine=affine
        )
    return paths


def write_datalist(items: list[dict], path: Path, label_scheme: str = "brats2023", section: str = "validation") -> Path:
    """A canonical datalist of generated/prepared cases (paths relative to it; ``seg`` becomes ``label``)."""
    base = Path(path).resolve().parent
    entries = []
    for item in items:
        entry = dict(item)
        if "seg" in entry:
            entry["label"] = entry.pop("seg")
        for key in (*CONTRASTS, "label"):
            if entry.get(key):
                entry[key] = os.path.relpath(Path(entry[key]).resolve(), base)
        entries.append(entry)
    other = "training" if section != "training" else "validation"
    return save_json({"layout": "generated", "label_scheme": label_scheme, section: entries, other: []}, path)


def to_grid(volume: np.ndarray, affine: np.ndarray, shape: Sequence[int], dst_affine: np.ndarray,
            mode: str = "bilinear") -> np.ndarray:
    """``volume`` [C, ...] on the grid ``affine`` resampled in world coordinates onto the grid (``shape``,
    ``dst_affine``): the model-grid output laid back over its input, whatever the chain did (crop, zoom, pad)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    img = MetaTensor(torch.as_tensor(np.asarray(volume, dtype=np.float32)), affine=torch.as_tensor(affine))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float64)(
        img, dst_affine=torch.as_tensor(np.asarray(dst_affine, dtype=np.float64)), spatial_size=tuple(shape))
    return np.asarray(out.detach().cpu(), dtype=np.float32)


OUTPUT_SPACES = ("input", "model")


class NiftiWriter:
    """Writes each sample as ``output_dir/<name>/<name>-<contrast>.nii.gz`` (+ ``-seg`` and a PNG montage), then
    ``generation.json`` (how samples were drawn) and ``datalist.json``.

    ``space="input"``: on the input mask's own grid, affine and header (a mask brought to the model grid by the
    bundle's chain gets its outputs resampled back, so they overlay it); ``"model"``: on the model grid."""

    def __init__(self, output_dir: str | os.PathLike, contrasts: Sequence[str] = CONTRASTS, montage: bool = True,
                 label_scheme: str = "brats2023", space: str = "input"):
        if space not in OUTPUT_SPACES:
            raise DataError("--output_space", f"unknown value {space!r}; choose one of {', '.join(OUTPUT_SPACES)}")
        self.space = space
        self.output_dir = check_output(str(output_dir), "dir", flag="output_dir")
        if (self.output_dir / "generation.json").exists():  # its samples and the new ones would mix in one datalist
            raise DataError(f"--output_dir {self.output_dir}", "holds an earlier generation (generation.json); "
                            "give a new folder, or remove this one to generate again")
        self.contrasts = tuple(contrasts)
        self.montage = bool(montage)
        self.label_scheme = label_scheme

    def write(self, name: str, volume: np.ndarray, item: dict) -> dict[str, Path]:
        grid = item.get("input_grid")
        if self.space == "input" and grid is not None:
            volume = to_grid(volume, item["affine"], grid["shape"], grid["affine"])
            return save_generated(volume, grid["affine"], grid["header"], self.output_dir, name, mask=grid["labels"],
                                  contrasts=self.contrasts, montage=self.montage)
        return save_generated(volume, item["affine"], item.get("header"), self.output_dir, name,
                              mask=item.get("labels"), contrasts=self.contrasts, montage=self.montage)

    def finish(self, records: list[dict], settings: dict) -> None:
        save_json({**settings, "samples": records}, self.output_dir / "generation.json")
        write_datalist(
            [{"id": r["case"], "source_id": r["source_id"], "seed": r["seed"],
              **{k: r["files"][k] for k in (*self.contrasts, "seg") if k in r["files"]}} for r in records],
            self.output_dir / "datalist.json", label_scheme=self.label_scheme)
