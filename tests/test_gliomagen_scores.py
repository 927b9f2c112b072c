"""GliomaGen's segmentation table (common.gliomagen.scores, python -m tools score-segmentation) on constructed
cases whose every number is worked out by hand below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.gliomagen import scores as S
from common.io import DataError, save_nifti

REPO = Path(__file__).resolve().parents[1]
GRID = (10, 10, 10)


def constructed():
    """Case 1: an NETC cube (4^3 = 64 voxels) predicted one voxel off along x.
    Case 2: SNFH cube (64) predicted exactly; an ET cube (2^3 = 8) predicted as RC."""
    r1, p1 = np.zeros(GRID, np.uint8), np.zeros(GRID, np.uint8)
    r1[2:6, 2:6, 2:6] = 1
    p1[3:7, 2:6, 2:6] = 1
    r2, p2 = np.zeros(GRID, np.uint8), np.zeros(GRID, np.uint8)
    r2[1:5, 1:5, 1:5] = 2
    p2[1:5, 1:5, 1:5] = 2
    r2[6:8, 6:8, 6:8] = 3
    p2[6:8, 6:8, 6:8] = 4
    return {"BraTS-GLI-02000-100": (p1, r1), "BraTS-GLI-02001-100": (p2, r2)}


# hand computation
# case 1, tumor voxels = union (80): agree 48 -> po 3/5; marginals 64/80 and 16/80 both -> pe 17/25; kappa -1/4
# case 2, tumor voxels = 72: agree 64 -> po 8/9; pe (64/72)^2 = 64/81; kappa (8/9 - 64/81) / (17/81) = 8/17
KAPPA = (-0.25 + 8 / 17) / 2
ACCURACY = (3 / 5 + 8 / 9) / 2
# pooled F1: NETC tp 48 fp 16 fn 16 -> 96/128; SNFH 1; ET fn 8 -> 0; RC fp 8 -> 0
F1 = {"NETC": 0.75, "SNFH": 1.0, "ET": 0.0, "RC": 0.0}
# Dice per label over cases where either map has it: NETC [0.75], SNFH [1], ET [0], RC [0]
DICE_MEAN = (0.75 + 1 + 0 + 0) / 4
# surfaces (6-connected boundary) of a 4^3 cube: 56 voxels; shifted by one voxel, 20 of them lie at distance 1 in
# each direction and the rest at 0 -> HD95 1, symmetric ASSD 40/112; SNFH is exact (0, 0); ET/RC never in both
HD95 = {"NETC": 1.0, "SNFH": 0.0}
ASSD = {"NETC": 40 / 112, "SNFH": 0.0}
# volumes (mL at 1 mm) per (case, label NETC, SNFH, ET, RC)
VOL_PRED = np.array([64, 0, 0, 0, 0, 64, 0, 8]) / 1000
VOL_REF = np.array([64, 0, 0, 0, 0, 64, 8, 0]) / 1000


def _pearson(x, y):
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _check(summary):
    assert summary["n_cases"] == 2
    assert summary["kappa"] == pytest.approx(KAPPA)
    assert summary["accuracy"] == pytest.approx(ACCURACY)
    assert summary["f1"] == pytest.approx(F1)
    assert summary["dice_mean"] == pytest.approx(DICE_MEAN)
    assert summary["hd95_per_label"]["NETC"] == pytest.approx(HD95["NETC"])
    assert summary["assd_per_label"]["NETC"] == pytest.approx(ASSD["NETC"])
    assert summary["hd95_per_label"]["SNFH"] == pytest.approx(0.0) and summary["hd95_per_label"]["ET"] is None
    assert summary["hd95"] == pytest.approx(np.mean(list(HD95.values())))
    assert summary["assd"] == pytest.approx(np.mean(list(ASSD.values())))
    assert summary["pearson_r"] == pytest.approx(_pearson(VOL_PRED, VOL_REF))
    assert summary["unmatched"] == {"NETC": 0, "SNFH": 0, "ET": 1, "RC": 1}
    # every voxel: case 1 has 32 wrong of 1000 voxels, case 2 has 8
    assert summary["accuracy_all"] == pytest.approx((968 / 1000 + 992 / 1000) / 2)


def test_scores_match_hand_computed_values():
    names = {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}
    cases = {cid: S.case_scores(p, r, list(names), (1.0, 1.0, 1.0)) for cid, (p, r) in constructed().items()}
    _check(S.summarise(cases, names))
    # spacing: a 2 mm voxel along x doubles the NETC distances along x and the volumes
    c = S.case_scores(*constructed()["BraTS-GLI-02000-100"], [1], (2.0, 1.0, 1.0))
    assert c["per_label"]["1"]["hd95"] == pytest.approx(2.0)
    assert c["per_label"]["1"]["volume_ref_ml"] == pytest.approx(0.128)


def _write(folder: Path, arrays: dict, suffix: str, prefix: str = ""):
    for cid, a in arrays.items():
        save_nifti(a, np.eye(4), folder / f"{prefix}{cid}{suffix}.nii.gz", dtype=np.uint8)


def test_cli_reads_folders_and_writes_the_table(tmp_path):
    data = constructed()
    _write(tmp_path / "pred", {k: p for k, (p, _) in data.items()}, "", prefix="real_")  # nnU-Net style names
    _write(tmp_path / "ref", {k: r for k, (_, r) in data.items()}, "-seg")  # BraTS style
    res = subprocess.run([sys.executable, "-m", "tools", "score-segmentation", "--pred", str(tmp_path / "pred"),
                          "--ref", str(tmp_path / "ref"), "--out", str(tmp_path / "out"), "--title", "Real only"],
                         cwd=REPO, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    assert "| Real only | 0.1103 | 0.7444 | 0.7500 | 1.0000 | 0.0000 | 0.0000 | 0.4375 |" in res.stdout
    result = json.loads((tmp_path / "out" / "scores.json").read_text())
    _check(result["summary"])
    assert sorted(result["cases"]) == sorted(data)
    assert (tmp_path / "out" / "scores.md").read_text().startswith("| Model | Kappa | Accuracy | F1 (NETC)")


def test_missing_or_mismatched_predictions_are_named(tmp_path):
    data = constructed()
    _write(tmp_path / "ref", {k: r for k, (_, r) in data.items()}, "-seg")
    first = next(iter(data))
    _write(tmp_path / "pred", {first: data[first][0]}, "")
    with pytest.raises(DataError, match="no prediction for 1 reference case"):
        S.score_folders(tmp_path / "pred", tmp_path / "ref", progress=False)
    save_nifti(np.zeros((10, 10, 9), np.uint8), np.eye(4), tmp_path / "pred" / "BraTS-GLI-02001-100.nii.gz", dtype=np.uint8)
    with pytest.raises(DataError, match="BraTS-GLI-02001-100.nii.gz: shape"):
        S.score_folders(tmp_path / "pred", tmp_path / "ref", progress=False)
    save_nifti(np.full(GRID, 9, np.uint8), np.eye(4), tmp_path / "pred" / "BraTS-GLI-02001-100.nii.gz", dtype=np.uint8)
    with pytest.raises(DataError, match="not in scheme"):
        S.score_folders(tmp_path / "pred", tmp_path / "ref", progress=False)
