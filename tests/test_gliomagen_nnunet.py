"""nnU-Net v2 raw exports of the GliomaGen training sets (common.gliomagen.nnunet, python -m tools export-nnunet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import CONTRASTS
from common.data.layouts import read_layout, write_case
from common.gliomagen import nnunet as N
from common.io import DataError, load_nifti, save_nifti

REPO = Path(__file__).resolve().parents[1]
SHAPE = (10, 10, 8)


def _labels(k: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[2:8, 2:8, 2:6] = 2
    m[3:6, 3:7, 3:5] = 3
    m[4:5, 4:6, 3:5] = 1
    if k % 2:
        m[6:8, 6:8, 5:7] = 4
    return m


def _dataset(root: Path, n: int, offset: int = 0) -> Path:
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    rng = np.random.default_rng(offset)
    for k in range(n):
        images = {c: rng.random(SHAPE).astype(np.float32) for c in CONTRASTS}
        write_case(root, "brats2024", f"BraTS-GLI-{2000 + offset + k:05d}-100", images, affine, _labels(k), "brats2024")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from common.generation.synthesis import synthesize_dataset

    base = tmp_path_factory.mktemp("nnunet_sources")
    real = _dataset(base / "real", 4)
    masks = [{"id": it["id"], "label": it["label"]} for it in read_layout(real)]

    def generate(case, seed):
        rng = np.random.default_rng(seed)
        return {c: (case["mask"] * (0.2 + 0.1 * i) + 0.05 * rng.random(SHAPE)).astype(np.float32)
                for i, c in enumerate(CONTRASTS)}

    synthesize_dataset(masks, generate, base / "synthetic", progress=False)
    aug_masks = [dict(m, id=m["id"].replace("GLI", "GLIAUGAA")) for m in masks]
    synthesize_dataset(aug_masks, generate, base / "augmented", progress=False)
    return base


def test_export_layout_dataset_json_and_case_names(sources, tmp_path):
    real = read_layout(sources / "real")
    syn = read_layout(sources / "synthetic")
    folder = N.export_dataset(tmp_path, 7, "GliomaGenRealSynthetic", [("real", real), ("syn", syn)])
    assert folder.name == "Dataset007_GliomaGenRealSynthetic"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T1Gd", "2": "T2", "3": "FLAIR"}
    assert meta["labels"] == {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3, "RC": 4}
    assert meta["numTraining"] == 8 and meta["file_ending"] == ".nii.gz"
    labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
    assert labels == sorted(f"{p}_{it['id']}.nii.gz" for p, items in (("real", real), ("syn", syn)) for it in items)
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    assert len(images) == 8 * 4 and images[0].endswith("_0000.nii.gz") and images[3].endswith("_0003.nii.gz")
    # channel k is contrast k, bytes unchanged
    case = real[0]
    assert (folder / "imagesTr" / f"real_{case['id']}_0001.nii.gz").read_bytes() == Path(case["t1c"]).read_bytes()
    with pytest.raises(DataError, match="not empty"):
        N.export_dataset(tmp_path, 7, "GliomaGenRealSynthetic", [("real", real)])
    with pytest.raises(DataError, match="twice"):
        N.export_dataset(tmp_path, 8, "Dup", [("real", real), ("real", real[:1])])


def test_six_label_sources_are_written_with_brats_labels(sources, tmp_path):
    real = read_layout(sources / "real")[:1]
    seg, affine, _ = load_nifti(real[0]["label"], dtype=None)
    six = np.where(seg > 0, seg + 1, 1).astype(np.uint8)
    save_nifti(six, affine, tmp_path / "six.nii.gz", dtype=np.uint8)
    item = dict(real[0], label=str(tmp_path / "six.nii.gz"), label_scheme="six_label")
    folder = N.export_dataset(tmp_path / "raw", 9, "Six", [("real", [item])])
    out, _, _ = load_nifti(folder / "labelsTr" / f"real_{item['id']}.nii.gz", dtype=None)
    assert np.array_equal(out, seg)


def test_paper_configurations_counts(sources):
    real, syn, aug = (read_layout(sources / k) for k in ("real", "synthetic", "augmented"))
    hq = [syn[0]["id"], aug[1]["id"], aug[2]["id"]]
    configs = N.paper_configurations(real, syn, aug, hq, seed=0)
    assert list(configs) == list(N.CONFIGURATIONS)
    count = {k: {p: len(v) for p, v in groups} for k, groups in configs.items()}
    assert count["real"] == {"real": 4}
    assert count["real+synthetic"] == {"real": 4, "syn": 4} and count["real+augmented"] == {"real": 4, "aug": 4}
    assert count["real+hq"] == {"real": 4, "syn": 1, "aug": 2} and count["hq"] == {"syn": 1, "aug": 2}
    assert count["half_real+hq"]["real"] == 2
    half = {it["id"] for it in dict(configs["half_real+hq"])["real"]}
    assert half == {it["id"] for it in dict(N.paper_configurations(real, syn, aug, hq, seed=0)["half_real+hq"])["real"]}
    assert N.paper_configurations(real).keys() == {"real"}
    with pytest.raises(DataError, match="high-quality"):
        N.paper_configurations(real, syn, aug, ["nope"])
    assert N.config_name("half_real+hq") == "GliomaGenHalfRealHQ"


def test_cli_exports_every_configuration(sources, tmp_path):
    cmd = [sys.executable, "-m", "tools", "export-nnunet", "--out", str(tmp_path), "--real", str(sources / "real"),
           "--synthetic", str(sources / "synthetic"), "--augmented", str(sources / "augmented"), "--hq_fraction", "0.25",
           "--dataset_id", "601", "--test", str(sources / "real")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("Dataset"))
    assert folders == ["Dataset601_GliomaGenReal", "Dataset602_GliomaGenRealSynthetic", "Dataset603_GliomaGenRealAugmented",
                       "Dataset604_GliomaGenRealHQ", "Dataset605_GliomaGenHalfRealHQ", "Dataset606_GliomaGenHQ"]
    n = {f: json.loads((tmp_path / f / "dataset.json").read_text())["numTraining"] for f in folders}
    assert list(n.values()) == [4, 8, 8, 6, 4, 2]  # HQ: the best quarter of 8 synthetic cases
    test = tmp_path / "GliomaGenTest"
    assert len(list((test / "imagesTs").glob("*_000[0-3].nii.gz"))) == 16 and len(list((test / "labelsTs").iterdir())) == 4


def test_nnunet_integrity_check_passes_on_exports_and_fails_on_bad_labels(sources, tmp_path):
    pytest.importorskip("nnunetv2", reason="optional extra: pip install -r requirements-nnunet.txt")
    real, syn = read_layout(sources / "real"), read_layout(sources / "synthetic")
    folder = N.export_dataset(tmp_path, 11, "GliomaGenRealSynthetic", [("real", real), ("syn", syn)])
    N.verify_integrity(folder)  # nnU-Net's own verify_dataset_integrity: raises on any problem
    bad = folder / "labelsTr" / f"real_{real[0]['id']}.nii.gz"
    seg, affine, header = load_nifti(bad, dtype=None)
    seg[0, 0, 0] = 7
    save_nifti(seg, affine, bad, header=header, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="unexpected labels"):
        N.verify_integrity(folder)
