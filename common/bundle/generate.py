"""Mask(s) in -> multi-contrast volumes out, on each mask's own grid. Every mask is checked before the first
sample is drawn, so a bad input stops the run with a clear error and no output at all."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common import CONTRASTS
from common.bundle.masks import collect_masks, load_mask
from common.bundle.outputs import save_generated
from common.io import save_json


def generate(
    network,
    inferer,
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    spatial_size: Sequence[int] | None = None,
    label_scheme: str | None = None,
    condition_scheme: str = "brats2023",
    section: str | Sequence[str] = ("validation",),
    contrasts: Sequence[str] = CONTRASTS,
    montage: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Generate ``inferer.num_samples`` image sets per mask; returns one record per written sample.

    ``input``: a mask NIfTI, a folder of masks or a datalist JSON (``label`` entries of ``section``).
    ``label_scheme``: the masks' label convention (default: the datalist's, else brats2023); masks are
    converted to ``condition_scheme`` (what the network was trained on). Outputs:
    ``output_dir/<case>-s<seed>/<case>-s<seed>-<contrast>.nii.gz`` (+ ``-seg`` and a PNG montage) and
    ``output_dir/generation.json`` (seeds, sampler, timing).
    """
    from tqdm.auto import tqdm

    input = Path(str(input))
    if not str(input) or str(input) == ".":
        raise ValueError("no mask input given: set 'input' to a mask NIfTI, a folder of masks or a datalist JSON")
    if label_scheme is None:
        label_scheme = "brats2023"
        if input.name.endswith(".json"):
            from common.data.datalist import datalist_info

            label_scheme = datalist_info(input).get("label_scheme", "brats2023")
    masks = collect_masks(input, section)
    checked = [
        (case_id, path, *load_mask(path, spatial_size, label_scheme, to_scheme=condition_scheme))
        for case_id, path in masks
    ]
    device = torch.device(device)
    network = network.to(device).eval()
    records = []
    for case_id, path, labels, affine, header in tqdm(checked, desc="masks", disable=not progress):
        start = time.perf_counter()
        mask_t = torch.as_tensor(labels.astype(np.float32))[None, None].to(device)
        images = inferer(mask_t, network).float().cpu().numpy()
        seconds = (time.perf_counter() - start) / max(len(images), 1)
        for seed, volume in zip(inferer.seeds, images):
            name = f"{case_id}-s{seed}"
            paths = save_generated(volume, affine, header, output_dir, name, mask=labels, contrasts=contrasts, montage=montage)
            records.append({"case": name, "source_id": case_id, "mask": str(path), "seed": int(seed),
                            "seconds": round(seconds, 2), "files": {k: str(v) for k, v in paths.items()}})
    save_json(
        {
            "sampler": type(inferer.scheduler).__name__,
            "num_inference_steps": inferer.num_inference_steps,
            "guidance_scale": inferer.guidance_scale,
            "samples": records,
        },
        Path(output_dir) / "generation.json",
    )
    write_datalist(
        [{"id": r["case"], "source_id": r["source_id"], "seed": r["seed"],
          **{k: r["files"][k] for k in (*contrasts, "seg") if k in r["files"]}} for r in records],
        Path(output_dir) / "datalist.json",
        label_scheme=condition_scheme,
    )
    return records


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
