"""Datalists: validation errors name case, file and problem; folds are deterministic, disjoint, stratified."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common import CONTRASTS
from common.data.datalist import assign_folds, build_datalist, case_problems, load_datalist, validate_case
from common.data.layouts import make_case_id, read_layout, write_case
from common.io import DataError, save_nifti

SHAPE = (16, 16, 12)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def _images(rng):
    return {c: (rng.random(SHAPE) + 1).astype(np.float32) for c in CONTRASTS}


def _label():
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[5:11, 5:11, 3:9] = 2
    label[7:9, 7:9, 5:7] = 3
    return label


def make_dataset(root: Path, layout="brats2023", n=6):
    rng = np.random.default_rng(0)
    for i in range(n):
        grade = "LGG" if i % 3 == 0 else "HGG"
        write_case(root, layout, make_case_id(layout, i, grade), _images(rng), AFFINE, _label(), "brats2023", grade)
    return root


def test_datalist_round_trip_relative_paths(tmp_path):
    root = make_dataset(tmp_path / "data")
    out = tmp_path / "lists" / "datalist.json"
    data = build_datalist(root, out, folds=3, seed=0, val_fold=1, progress=False)
    raw = json.loads(out.read_text())
    assert raw["layout"] == "brats2023" and raw["label_scheme"] == "brats2023" and raw["root"] == "../data"
    assert all(not Path(it["t1n"]).is_absolute() and it["t1n"].startswith("../data/") for it in raw["training"])
    assert {it["fold"] for it in raw["validation"]} == {1} and 1 not in {it["fold"] for it in raw["training"]}
    assert len(raw["training"]) + len(raw["validation"]) == 6 and len(raw["validation"]) == 2
    items = load_datalist(out)
    assert [it["id"] for it in items] == [it["id"] for it in data["training"] + data["validation"]]
    assert all(Path(it[k]).is_file() for it in items for k in (*CONTRASTS, "label"))
    assert {Path(it["t2f"]).name for it in items} == {f"{it['id']}-t2f.nii.gz" for it in items}
    only_val = load_datalist(out, "validation")
    assert len(only_val) == 2
    # MONAI's own loader resolves the same paths
    from monai.data import load_decathlon_datalist

    monai_items = load_decathlon_datalist(str(out), is_segmentation=True, data_list_key="training")
    assert [it["t1c"] for it in monai_items] == [it["t1c"] for it in load_datalist(out, "training")]
    assert [it["label"] for it in monai_items] == [it["label"] for it in load_datalist(out, "training")]


def test_folds_deterministic_disjoint_stratified():
    items = [{"id": f"c{i:02d}", "grade": "LGG" if i < 8 else "HGG"} for i in range(23)]
    a = assign_folds(items, 5, seed=3)
    assert a == assign_folds(list(reversed(items))[::-1], 5, seed=3)
    assert a == [dict(zip([it["id"] for it in items], a))[it["id"]] for it in items]
    shuffled = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    assert [dict(zip([it["id"] for it in shuffled], assign_folds(shuffled, 5, seed=3)))[it["id"]] for it in items] == a
    assert assign_folds(items, 5, seed=4) != a
    sizes = np.bincount(a, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 23
    lgg = np.bincount([f for f, it in zip(a, items) if it["grade"] == "LGG"], minlength=5)
    assert lgg.max() - lgg.min() <= 1  # 8 LGG over 5 folds: 1 or 2 each


def test_every_case_lands_in_exactly_one_validation_fold(tmp_path):
    root = make_dataset(tmp_path / "data", layout="msd", n=5)
    seen = []
    for k in range(5):
        out = tmp_path / f"dl{k}.json"
        data = build_datalist(root, out, folds=5, seed=0, val_fold=k, check="quick", progress=False)
        seen += [it["id"] for it in data["validation"]]
        assert not {it["id"] for it in data["validation"]} & {it["id"] for it in data["training"]}
        assert data["training"][0]["t2f_channel"] == 0
    assert sorted(seen) == sorted(make_case_id("msd", i) for i in range(5))


def _one_case(tmp_path):
    root = make_dataset(tmp_path / "data", n=1)
    return read_layout(root)[0]


def _expect_error(item, file_key, pattern, check="full", scheme="brats2023"):
    problems = case_problems(item, scheme, check)
    assert problems, "the broken case passed validation"
    message = "\n".join(str(p) for p in problems)
    assert item["id"] in message
    assert Path(item[file_key]).name in message
    assert re.search(pattern, message), message
    with pytest.raises(DataError, match=item["id"]):
        validate_case(item, scheme, check)


def test_clean_case_passes(tmp_path):
    item = _one_case(tmp_path)
    assert case_problems(item, "brats2023") == [] and case_problems(item, "brats2023", "quick") == []


def test_missing_contrast(tmp_path):
    item = _one_case(tmp_path)
    Path(item["t1c"]).unlink()
    _expect_error(item, "t1c", "t1c: file does not exist", check="quick")


def test_mismatched_shapes(tmp_path):
    item = _one_case(tmp_path)
    save_nifti(np.ones((16, 16, 10), np.float32), AFFINE, item["t2w"])
    _expect_error(item, "t2w", r"shape \(16, 16, 10\)", check="quick")


def test_mismatched_affines(tmp_path):
    item = _one_case(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    save_nifti(np.ones(SHAPE, np.float32), shifted, item["t2f"])
    _expect_error(item, "t2f", "affine differs .* by up to 0.5")
    tiny = AFFINE.copy()
    tiny[0, 3] += 1e-5  # within tolerance
    save_nifti(np.ones(SHAPE, np.float32), tiny, item["t2f"])
    assert case_problems(item, "brats2023") == []


def test_empty_and_unreadable_files(tmp_path):
    item = _one_case(tmp_path)
    Path(item["t1n"]).write_bytes(b"")
    _expect_error(item, "t1n", "empty", check="quick")
    Path(item["t1n"]).write_bytes(b"this is not a nifti file at all" * 20)
    _expect_error(item, "t1n", "unreadable")


def test_nan_and_all_zero(tmp_path):
    item = _one_case(tmp_path)
    bad = np.ones(SHAPE, np.float32)
    bad[0, 0, 0] = np.nan
    bad[1, 1, 1] = np.inf
    save_nifti(bad, AFFINE, item["t2w"])
    _expect_error(item, "t2w", "2 NaN/Inf")
    save_nifti(np.zeros(SHAPE, np.float32), AFFINE, item["t2w"])
    _expect_error(item, "t2w", "all zeros")
    assert case_problems(item, "brats2023", "quick") == []  # quick reads headers only


def test_labels_outside_scheme(tmp_path):
    item = _one_case(tmp_path)
    label = _label()
    label[0, 0, 0] = 4
    save_nifti(label, AFFINE, item["label"], dtype=np.uint8)
    _expect_error(item, "label", r"label values \[4\] .*brats2023.*brats2024")
    assert case_problems(item, "brats2024") == []


def test_msd_channel_problems(tmp_path):
    root = make_dataset(tmp_path / "data", layout="msd", n=1)
    item = read_layout(root)[0]
    img = nib.load(item["t1n"])
    volume = np.asarray(img.dataobj).copy()
    volume[..., 2] = 0  # T1gd channel empty
    save_nifti(volume, img.affine, item["t1n"])
    problems = case_problems(item, "msd")
    assert len(problems) == 1 and "t1c image is all zeros (channel 2)" in str(problems[0])
    save_nifti(volume[..., :2], img.affine, item["t1n"])
    assert any("should be channel 2 of a 4-D image" in str(p) for p in case_problems(item, "msd"))


def test_all_errors_of_all_cases_reported_and_nothing_written(tmp_path):
    root = make_dataset(tmp_path / "data", n=4)
    items = read_layout(root)
    Path(items[0]["t2f"]).unlink()
    save_nifti(np.zeros(SHAPE, np.float32), AFFINE, items[2]["t1n"])
    out = tmp_path / "datalist.json"
    with pytest.raises(DataError) as info:
        build_datalist(root, out, folds=2, progress=False)
    message = str(info.value)
    assert "2 of 4 case(s)" in message
    assert items[0]["id"] in message and Path(items[0]["t2f"]).name in message
    assert items[2]["id"] in message and "all zeros" in message
    assert not out.exists() and not list(tmp_path.glob(".datalist*"))


def test_cli(tmp_path):
    root = make_dataset(tmp_path / "data", layout="brats2021", n=4)
    out = tmp_path / "dl.json"
    cmd = [sys.executable, "-m", "tools", "datalist", "--root", str(root), "--out", str(out), "--folds", "2",
           "--seed", "1", "--check", "quick", "--progress", "False"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["layout"] == "brats2021"
    Path(read_layout(root)[1]["label"]).unlink()
    out.unlink()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode != 0 and "nothing written" in done.stderr and "_seg.nii.gz" in done.stderr
    assert not out.exists()
