"""nnU-Net v2 raw datasets for GliomaGen's downstream segmentation study (real vs real + synthetic training sets).

Layout written (the one ``nnUNetv2_plan_and_preprocess`` reads from ``$nnUNet_raw``)::

    Dataset501_GliomaGenReal/
        imagesTr/<case>_0000.nii.gz .. _0003.nii.gz   channels t1n, t1c, t2w, t2f
        labelsTr/<case>.nii.gz                        BraTS 2024 labels 0 bg, 1 NETC, 2 SNFH, 3 ET, 4 RC
        dataset.json                                  channel_names, labels, numTraining, file_ending
        cases.json                                    where every case came from (not read by nnU-Net)

Case identifiers are ``<source>_<id>`` (``real_``, ``syn_``, ``aug_``) so a synthetic case made from a real mask
never collides with that real case. The paper's configurations are built by ``paper_configurations``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common import CONTRASTS
from common.data.labels import convert_labels, get_scheme
from common.io import DataError, atomic_path, load_nifti, save_json, save_nifti

LABEL_SCHEME = "brats2024"
CHANNEL_NAMES = {"t1n": "T1", "t1c": "T1Gd", "t2w": "T2", "t2f": "FLAIR"}
# the paper's training sets (Fig. 13): real only, + synthetic from real masks, + synthetic from augmented masks,
# + the high-quality synthetic subset, half the real cases + that subset, and the subset alone
CONFIGURATIONS = ("real", "real+synthetic", "real+augmented", "real+hq", "half_real+hq", "hq")


def nnunet_labels(scheme: str = LABEL_SCHEME) -> dict[str, int]:
    """``dataset.json`` labels: the scheme's compartments by value (nnU-Net needs them consecutive from 0)."""
    s = get_scheme(scheme)
    values = sorted(s.values)
    if values != list(range(len(values))):
        raise DataError(scheme, f"nnU-Net needs consecutive labels 0..K; scheme {s.name} has {values}")
    return {s.values[v]: v for v in values}


def dataset_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise DataError("--dataset_id", f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise DataError("--name", f"{name!r}: use letters, digits and underscores only")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _copy(src: Path, dst: Path, mode: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        tmp = dst.with_name(f".{dst.name}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(Path(src).resolve(), tmp)
        os.replace(tmp, dst)
    else:
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def export_dataset(
    out_root: str | os.PathLike,
    dataset_id: int,
    name: str,
    groups: Sequence[tuple[str, Sequence[Mapping]]],
    label_scheme: str = LABEL_SCHEME,
    mode: str = "copy",
    description: str = "",
) -> Path:
    """Write one nnU-Net v2 raw dataset from ``groups`` = ``[(source prefix, canonical items), ...]``.

    Items are ``common.data.layouts`` items (``id``, the four contrast paths, ``label``) whose labels are in
    ``label_scheme`` (or the item's own ``label_scheme``); labels are converted to BraTS 2024 values when the
    scheme differs (e.g. ``six_label``: head -> background). ``mode``: ``copy`` or ``symlink`` the images.
    """
    if mode not in ("copy", "symlink"):
        raise DataError("--mode", f"{mode!r}: choose copy or symlink")
    folder = Path(out_root) / dataset_name(dataset_id, name)
    if folder.exists() and any(folder.iterdir()):
        raise DataError(folder, "already exists and is not empty; remove it or choose another dataset id")
    labels = nnunet_labels(LABEL_SCHEME)
    cases, seen = [], set()
    for prefix, items in groups:
        for item in items:
            case = f"{prefix}_{item['id']}"
            if case in seen:
                raise DataError(item.get("label") or item["id"], f"case {case} appears twice in dataset {name}")
            seen.add(case)
            missing = [k for k in (*CONTRASTS, "label") if not item.get(k) or not Path(item[k]).exists()]
            if missing:
                raise DataError(item["id"], f"missing files for {missing}")
            cases.append((case, prefix, item))
    if not cases:
        raise DataError(name, "no cases to export")
    for case, _, item in cases:
        for k, contrast in enumerate(CONTRASTS):
            _copy(Path(item[contrast]), folder / "imagesTr" / f"{case}_{k:04d}.nii.gz", mode)
        _write_label(item, folder / "labelsTr" / f"{case}.nii.gz", item.get("label_scheme", label_scheme), mode)
    save_json({
        "name": name,
        "description": description or f"GliomaGen downstream segmentation: {name}",
        "channel_names": {str(k): CHANNEL_NAMES[c] for k, c in enumerate(CONTRASTS)},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "reference": "brats-synth common.gliomagen.nnunet",
        "licence": "see the source datasets",
    }, folder / "dataset.json")
    save_json({"cases": [{"case": c, "source": p, "id": it["id"], "label": str(it["label"])} for c, p, it in cases],
               "counts": {p: sum(1 for _, q, _ in cases if q == p) for p, _ in groups}}, folder / "cases.json")
    return folder


def export_test_set(out_root: str | os.PathLike, items: Sequence[Mapping], name: str = "GliomaGenTest",
                    label_scheme: str = LABEL_SCHEME, mode: str = "copy") -> Path:
    """Held-out real cases for ``nnUNetv2_predict``: ``<out>/<name>/imagesTs/<id>_0000..3`` and ``labelsTs/<id>``
    (the references for ``python -m tools score-segmentation``)."""
    folder = Path(out_root) / name
    if folder.exists() and any(folder.iterdir()):
        raise DataError(folder, "already exists and is not empty; remove it or choose another name")
    if not items:
        raise DataError(name, "no test cases to export")
    for item in items:
        for k, contrast in enumerate(CONTRASTS):
            _copy(Path(item[contrast]), folder / "imagesTs" / f"{item['id']}_{k:04d}.nii.gz", mode)
        _write_label(item, folder / "labelsTs" / f"{item['id']}.nii.gz", item.get("label_scheme", label_scheme), mode)
    return folder


def _write_label(item: Mapping, dst: Path, scheme: str, mode: str) -> None:
    if get_scheme(scheme).name == LABEL_SCHEME:
        _copy(Path(item["label"]), dst, mode)
    else:
        seg, affine, header = load_nifti(item["label"], dtype=None)
        save_nifti(convert_labels(seg, scheme, LABEL_SCHEME, where=item["label"]), affine, dst, header=header,
                   dtype=np.uint8)


def paper_configurations(
    real: Sequence[Mapping],
    synthetic: Sequence[Mapping] = (),
    augmented: Sequence[Mapping] = (),
    hq_ids: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, list[tuple[str, list]]]:
    """The paper's training sets as ``export_dataset`` groups. ``hq_ids``: ids of the high-quality synthetic
    subset (``common.generation.synthesis.select_high_quality``) taken from ``synthetic`` + ``augmented``;
    ``half_real``: a seeded random half of the real cases. Configurations whose inputs are missing are left out."""
    real, synthetic, augmented = list(real), list(synthetic), list(augmented)
    hq_set = set(hq_ids)
    hq = [("syn", it) for it in synthetic if it["id"] in hq_set] + [("aug", it) for it in augmented if it["id"] in hq_set]
    unknown = hq_set - {it["id"] for _, it in hq}
    if unknown:
        raise DataError("hq_ids", f"{len(unknown)} high-quality ids not among the synthetic cases, e.g. {sorted(unknown)[:3]}")
    half = [real[i] for i in sorted(np.random.default_rng(seed).permutation(len(real))[: len(real) // 2])]
    hq_groups = [(p, [it for q, it in hq if q == p]) for p in ("syn", "aug")]
    hq_groups = [g for g in hq_groups if g[1]]
    configs = {
        "real": [("real", real)],
        "real+synthetic": [("real", real), ("syn", synthetic)] if synthetic else None,
        "real+augmented": [("real", real), ("aug", augmented)] if augmented else None,
        "real+hq": [("real", real), *hq_groups] if hq else None,
        "half_real+hq": [("real", half), *hq_groups] if hq else None,
        "hq": hq_groups if hq else None,
    }
    return {k: v for k, v in configs.items() if v and any(items for _, items in v)}


def config_name(config: str) -> str:
    """``half_real+hq`` -> ``GliomaGenHalfRealHQ`` (nnU-Net dataset names: letters, digits, underscores)."""
    words = {"real": "Real", "synthetic": "Synthetic", "augmented": "Augmented", "hq": "HQ", "half": "Half"}
    return "GliomaGen" + "".join(words.get(w, w.title()) for w in re.split(r"[+_]", config))


def verify_integrity(folder: str | os.PathLike, num_processes: int = 1) -> None:
    """Run nnU-Net's own ``verify_dataset_integrity`` (needs the optional ``nnunetv2``: requirements-nnunet.txt)."""
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError as exc:
        raise DataError("nnunetv2", f"not installed ({exc}); pip install -r requirements-nnunet.txt") from exc
    verify_dataset_integrity(str(folder), num_processes=num_processes)
