"""Real (or phantom) cases brought to a generator's grid exactly as its validation data is, by the bundle's own
deterministic chain (read from its configs, not restated here), and written as NIfTI with the affine MONAI
tracked through those steps: the held-out reference for evaluation and the masks for inference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from common.io import save_nifti


def bundle_config(bundle: str | os.PathLike, config_files: Sequence[str], **overrides: Any):
    """A ``monai.bundle.ConfigParser`` over a bundle's configs (names relative to its ``configs/``), with
    ``bundle_root`` set and ``overrides`` applied, so callers read the bundle's own chains and networks."""
    from monai.bundle import ConfigParser

    from common.bundle.run import bundle_root

    root = bundle_root(bundle)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / f) for f in config_files])
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def prepare_cases(
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike = "brats_mri_ldm3d",
    config_files: Sequence[str] = ("inference.json",),
    section: str | Sequence[str] = "validation",
    chain: str = "preprocessing",
    progress: bool = True,
    **overrides: Any,
) -> list[dict]:
    """Write ``out_dir/<id>/<id>-<contrast>.nii.gz`` and ``<id>-seg.nii.gz`` for every case of ``section``, through
    the bundle's ``chain`` (its deterministic preprocessing); returns ``[{"id", "label", <contrast>: path}]``."""
    from tqdm.auto import tqdm

    from common.data.datalist import datalist_info, load_datalist
    from common.generation.writers import write_datalist

    scheme = datalist_info(datalist).get("label_scheme", "brats2023")
    parser = bundle_config(bundle, config_files, label_scheme=scheme, **overrides)
    transform = parser.get_parsed_content(chain)
    contrasts = parser.get_parsed_content("contrasts")
    condition_scheme = parser.get_parsed_content("condition_scheme")
    written = []
    for item in tqdm(load_datalist(datalist, section), desc="preparing cases", disable=not progress):
        d = transform(dict(item))
        affine = np.asarray(d["image"].affine)
        folder = Path(out_dir) / item["id"]
        entry = {"id": item["id"]}
        for c, contrast in enumerate(contrasts):
            vol = np.asarray(d["image"][c])
            entry[contrast] = str(save_nifti(vol, affine, folder / f"{item['id']}-{contrast}.nii.gz", dtype=np.float32))
        entry["label"] = str(save_nifti(np.asarray(d["label"][0]), affine, folder / f"{item['id']}-seg.nii.gz",
                                        dtype=np.uint8))
        written.append(entry)
    write_datalist([{**e, "seg": e.pop("label")} for e in [dict(w) for w in written]], Path(out_dir) / "datalist.json",
                   label_scheme=condition_scheme)
    return written
