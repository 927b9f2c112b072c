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


class NiftiWriter:
    """Writes each sample as ``output_dir/<name>/<name>-<contrast>.nii.gz`` (+ ``-seg`` and a PNG montage) on its
    condition's affine/header, then ``generation.json`` (how samples were drawn) and ``datalist.json``."""

    def __init__(self, output_dir: str | os.PathLike, contrasts: Sequence[str] = CONTRASTS, montage: bool = True,
                 label_scheme: str = "brats2023"):
        self.output_dir = check_output(str(output_dir), "dir", flag="output_dir")
        if (self.output_dir / "generation.json").exists():  # its samples and the new ones would mix in one datalist
            raise DataError(f"--output_dir {self.output_dir}", "holds an earlier generation (generation.json); "
                            "give a new folder, or remove this one to generate again")
        self.contrasts = tuple(contrasts)
        self.montage = bool(montage)
        self.label_scheme = label_scheme

    def write(self, name: str, volume: np.ndarray, item: dict) -> dict[str, Path]:
        return save_generated(volume, item["affine"], item.get("header"), self.output_dir, name,
                              mask=item.get("labels"), contrasts=self.contrasts, montage=self.montage)

    def finish(self, records: list[dict], settings: dict) -> None:
        save_json({**settings, "samples": records}, self.output_dir / "generation.json")
        write_datalist(
            [{"id": r["case"], "source_id": r["source_id"], "seed": r["seed"],
              **{k: r["files"][k] for k in (*self.contrasts, "seg") if k in r["files"]}} for r in records],
            self.output_dir / "datalist.json", label_scheme=self.label_scheme)
