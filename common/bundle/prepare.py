"""Real (or phantom) cases brought to a generator's grid exactly as its validation data is (crop to the head,
z-score on non-zero voxels, scale to fit + zero-pad, no randomness) and written as NIfTI with the affine
MONAI tracked through those steps: the held-out reference for evaluation and the masks for inference."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from common import CONTRASTS
from common.io import save_nifti


def fit_transform(spatial_size: Sequence[int], label_scheme: str, condition_scheme: str = "brats2023",
                  contrasts: Sequence[str] = CONTRASTS):
    """The deterministic chain of the bundles' ``validate#preprocessing`` (MetaTensors kept for the affine)."""
    from monai.transforms import Compose, CropForegroundd, NormalizeIntensityd

    from common.data.transforms import ConvertLabelSchemed, LoadCanonicald, RandScaleZeroPadd

    return Compose([
        LoadCanonicald(contrasts=contrasts),
        ConvertLabelSchemed(keys="label", src=label_scheme, dst=condition_scheme, lossy="background"),
        CropForegroundd(keys=["image", "label"], source_key="image", allow_smaller=True),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        RandScaleZeroPadd(keys=["image", "label"], spatial_size=spatial_size, prob=0.0, fit=True),
    ])


def prepare_cases(
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    spatial_size: Sequence[int],
    section: str | Sequence[str] = "validation",
    contrasts: Sequence[str] = CONTRASTS,
    condition_scheme: str = "brats2023",
    progress: bool = True,
) -> list[dict]:
    """Write ``out_dir/<id>/<id>-<contrast>.nii.gz`` and ``<id>-seg.nii.gz`` for every case of ``section``;
    returns ``[{"id", "label", <contrast>: path}]`` (a datalist-like list)."""
    from tqdm.auto import tqdm

    from common.data.datalist import datalist_info, load_datalist

    scheme = datalist_info(datalist).get("label_scheme", "brats2023")
    transform = fit_transform(spatial_size, scheme, condition_scheme, contrasts)
    written = []
    for item in tqdm(load_datalist(datalist, section), desc="preparing cases", disable=not progress):
        d = transform(dict(item))
        affine = np.asarray(d["image"].affine)
        folder = Path(out_dir) / item["id"]
        entry = {"id": item["id"]}
        for c, contrast in enumerate(contrasts):
            vol = d["image"][c].numpy()
            entry[contrast] = str(save_nifti(vol, affine, folder / f"{item['id']}-{contrast}.nii.gz", dtype=np.float32))
        entry["label"] = str(save_nifti(d["label"][0].numpy(), affine, folder / f"{item['id']}-seg.nii.gz", dtype=np.uint8))
        written.append(entry)
    from common.bundle.generate import write_datalist

    write_datalist([{**e, "seg": e.pop("label")} for e in [dict(w) for w in written]], Path(out_dir) / "datalist.json",
                   label_scheme=condition_scheme)
    return written
