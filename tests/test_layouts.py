"""Dataset layouts: write tiny cases in every layout, detect the layout, read canonical items back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common import CONTRASTS
from common.data.labels import convert_labels
from common.data.layouts import (
    LAYOUTS,
    contrast_of_filename,
    detect_layout,
    layout_label_scheme,
    make_case_id,
    read_layout,
    write_case,
)
from common.io import DataError, load_nifti

SHAPE = (16, 16, 12)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
AFFINE[:3, 3] = [-12.0, -12.0, -10.0]


def tiny_case(seed: int):
    """Four distinguishable random contrasts and a brats2024 blob label (ET core, NETC, SNFH, a small RC)."""
    rng = np.random.default_rng(seed)
    images = {c: (rng.random(SHAPE) + 10 * k).astype(np.float32) for k, c in enumerate(CONTRASTS)}
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[4:12, 4:12, 3:9] = 2
    label[6:10, 6:10, 4:8] = 1
    label[7:9, 7:9, 5:7] = 3
    return images, label


def _write_dataset(root: Path, layout: str, n: int = 3, with_rc: bool = False):
    grades = ["HGG", "LGG", "HGG", "LGG"][:n]
    written = {}
    for i, grade in enumerate(grades):
        images, label = tiny_case(i)
        if with_rc:
            label[0:2, 0:2, 0:2] = 4
        case_id = make_case_id(layout, i, grade)
        write_case(root, layout, case_id, images, AFFINE, label=label, label_scheme="brats2024", grade=grade)
        written[case_id] = (images, label, grade)
    return written


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_write_detect_read_every_layout(tmp_path, layout):
    written = _write_dataset(tmp_path, layout)
    assert detect_layout(tmp_path) == layout
    items = read_layout(tmp_path)
    assert [it["id"] for it in items] == sorted(written)
    scheme = layout_label_scheme(tmp_path)
    for item in items:
        images, label, grade = written[item["id"]]
        assert item["grade"] == grade
        for c in CONTRASTS:
            data, affine, _ = load_nifti(item[c])
            if layout == "msd":
                assert data.shape == SHAPE + (4,)
                data = data[..., item[f"{c}_channel"]]
            np.testing.assert_allclose(data, images[c], rtol=1e-6)  # the right contrast under the right key
            np.testing.assert_allclose(affine, AFFINE)
        seg, _, _ = load_nifti(item["label"], dtype=None)
        np.testing.assert_array_equal(seg, convert_labels(label, "brats2024", scheme))


def test_misnamed_brats2020_segmentation_is_found(tmp_path):
    _write_dataset(tmp_path, "brats2020", n=1)
    case = tmp_path / "BraTS20_Training_001"
    (case / "BraTS20_Training_001_seg.nii.gz").rename(case / "W39_1998.09.19_Segm.nii.gz")
    assert Path(read_layout(tmp_path)[0]["label"]).name == "W39_1998.09.19_Segm.nii.gz"
    (case / "W39_1998.09.19_Segm.nii.gz").unlink()
    assert Path(read_layout(tmp_path)[0]["label"]).name == "BraTS20_Training_001_seg.nii.gz"  # reported later
    assert read_layout(tmp_path, require_label=False)[0]["label"] is None


def test_file_names_follow_each_layout(tmp_path):
    _write_dataset(tmp_path / "a", "brats2019", n=2)
    case = tmp_path / "a/MICCAI_BraTS_2019_Data_Training/LGG/BraTS19_TCIA10_101_1"
    assert (case / "BraTS19_TCIA10_101_1_t1ce.nii.gz").exists()
    _write_dataset(tmp_path / "b", "brats2020", n=2)
    mapping = (tmp_path / "b/name_mapping.csv").read_text().splitlines()
    assert mapping[0].startswith("Grade,") and "LGG" in mapping[2] and "BraTS20_Training_002" in mapping[2]
    assert (tmp_path / "b/BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz").exists()
    _write_dataset(tmp_path / "c", "brats2023", n=1)
    assert (tmp_path / "c/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz").exists()
    assert (tmp_path / "c/grades.csv").read_text().splitlines() == ["case_id,grade", "BraTS-GLI-00000-000,HGG"]
    _write_dataset(tmp_path / "d", "msd", n=2)
    meta = json.loads((tmp_path / "d/dataset.json").read_text())
    assert meta["numTraining"] == 2 and meta["modality"]["0"] == "FLAIR"
    assert meta["training"][1] == {"image": "./imagesTr/BRATS_002.nii.gz", "label": "./labelsTr/BRATS_002.nii.gz"}


def test_brats2019_labels_are_written_in_the_old_scheme(tmp_path):
    _write_dataset(tmp_path, "brats2019", n=1)
    seg, _, _ = load_nifti(read_layout(tmp_path)[0]["label"], dtype=None)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}  # ET written as 4


def test_rc_into_a_scheme_without_it(tmp_path):
    with pytest.raises(DataError, match="RC"):
        _write_dataset(tmp_path / "x", "brats2023", n=1, with_rc=True)
    assert not list((tmp_path / "x").rglob("*seg*"))  # failed before writing the label
    images, label = tiny_case(0)
    label[0, 0, 0] = 4
    write_case(tmp_path / "y", "brats2021", "BraTS2021_00000", images, AFFINE, label, "brats2024", lossy="background")
    seg, _, _ = load_nifti(read_layout(tmp_path / "y")[0]["label"], dtype=None)
    assert seg[0, 0, 0] == 0 and 4 in seg  # cavity dropped, ET kept as 4


def test_brats2024_keeps_rc_and_is_told_apart_from_2023(tmp_path):
    _write_dataset(tmp_path, "brats2024", n=2, with_rc=True)
    assert detect_layout(tmp_path) == "brats2024"
    seg, _, _ = load_nifti(read_layout(tmp_path)[0]["label"], dtype=None)
    assert 4 in seg and 3 in seg


def test_wrapped_download_and_grade_updates(tmp_path):
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    _write_dataset(root, "brats2023", n=2)
    images, label = tiny_case(0)
    write_case(root, "brats2023", "BraTS-GLI-00000-000", images, AFFINE, label, "brats2023", grade="LGG")  # re-grade
    assert detect_layout(tmp_path) == "brats2023"
    items = read_layout(tmp_path)
    assert [it["grade"] for it in items] == ["LGG", "LGG"]
    assert Path(items[0]["t1n"]).is_absolute()


def test_generic_aliases_and_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    names = {"case_a": ["T1.nii.gz", "T1_GD.nii.gz", "T2.nii.gz", "T2-FLAIR.nii.gz", "tumor_mask.nii.gz"],
             "case_b": ["b_t1w.nii", "b_t1ce.nii", "b_t2w.nii", "b_flair.nii", "brain_mask.nii"]}
    from common.io import save_nifti

    for case, files in names.items():
        for name in files:
            save_nifti(rng.random(SHAPE).astype(np.float32), AFFINE, tmp_path / case / name)
    assert detect_layout(tmp_path) == "generic"
    items = {it["id"]: it for it in read_layout(tmp_path)}
    a = items["case_a"]
    assert [Path(a[k]).name for k in (*CONTRASTS, "label")] == names["case_a"]
    assert "problems" not in a
    b = items["case_b"]
    assert b["label"] is None and "no label file" in str(b["problems"][0])  # a brain mask is not a tumor label
    assert "problems" not in read_layout(tmp_path, require_label=False)[1]


@pytest.mark.parametrize(
    "name,key",
    [("x_T2-FLAIR.nii.gz", "t2f"), ("a_t1_ce.nii", "t1c"), ("T1GD.nii", "t1c"), ("a_T1.nii.gz", "t1n"),
     ("d_T1w.nii.gz", "t1n"), ("b_t2.nii.gz", "t2w"), ("c_seg.nii.gz", "label"), ("brain_mask.nii.gz", None),
     ("notes.txt", None)],
)
def test_contrast_aliases(name, key):
    assert contrast_of_filename(name) == key


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        read_layout(tmp_path / "empty")
    images, label = tiny_case(0)
    with pytest.raises(ValueError, match="HGG/LGG folder"):
        write_case(tmp_path / "n", "brats2019", "BraTS19_X_1", images, AFFINE, label)
    with pytest.raises(ValueError, match="missing"):
        write_case(tmp_path / "n", "brats2023", "BraTS-GLI-00000-000", {"t1n": images["t1n"]}, AFFINE)
    (tmp_path / "g").mkdir()
    (tmp_path / "g/grades.csv").write_text("case_id,grade\nBraTS-GLI-00000-000,GBM\n")
    write_case(tmp_path / "g", "brats2023", "BraTS-GLI-00001-000", images, AFFINE, label, "brats2023")
    with pytest.raises(DataError, match=r"grades.csv.*GBM"):
        read_layout(tmp_path / "g")


def test_case_ids_are_realistic_and_unique():
    for layout in LAYOUTS:
        ids = {make_case_id(layout, i, "HGG") for i in range(30)} | {make_case_id(layout, i, "LGG") for i in range(30)}
        assert len(ids) >= 30
    assert make_case_id("brats2021", 7) == "BraTS2021_00007"
    assert make_case_id("brats2023", 7) == "BraTS-GLI-00007-000"
    assert make_case_id("msd", 0) == "BRATS_001"
    assert make_case_id("brats2019", 27, "HGG") == "BraTS19_CBICA_ABB_1"


def _record_many(root: str, start: int) -> None:
    from common.data.layouts import GRADES_CSV, _record_grade

    for i in range(start, start + 25):
        _record_grade(Path(root) / GRADES_CSV, "case_id", ("case_id", "grade"), f"BraTS-GLI-{i:05d}-000", "grade",
                      "HGG" if i % 2 else "LGG")


def test_parallel_case_writers_keep_every_grade(tmp_path):
    """Phantom workers record their cases' grades in one grades.csv at once: none may be lost (read-modify-write
    under a folder lock); a lost row made a case 'have no grade' for class-conditional training."""
    import multiprocessing as mp

    from common.data.layouts import GRADES_CSV, read_grades

    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(str(tmp_path), start)) for start in (0, 100, 200)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    grades = read_grades(tmp_path / GRADES_CSV)
    assert len(grades) == 75 and grades["BraTS-GLI-00101-000"] == "HGG"
    assert [p.name for p in tmp_path.iterdir()] == [GRADES_CSV]  # no lock file left in the dataset
