"""GliomaGen's 6-label condition and mask augmentation (common.gliomagen.masks, python -m tools augment-masks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import CONTRASTS
from common.gliomagen import masks as M
from common.io import DataError, load_nifti, open_nifti, save_nifti

REPO = Path(__file__).resolve().parents[1]
GRID = (40, 40, 30)


def _ball(center, radius, shape=GRID, radii=None):
    g = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = radii or (radius,) * 3
    return sum(((g[i] - center[i]) / r[i]) ** 2 for i in range(3)) <= 1


def constructed_mask(dx: int = 0) -> np.ndarray:
    """Head ellipsoid with a nested tumor: SNFH around ET around NETC, and a resection cavity."""
    m = np.zeros(GRID, np.uint8)
    m[_ball((20, 20, 15), 0, radii=(17, 17, 13))] = M.HEAD
    c = (21 + dx, 20, 15)
    m[_ball(c, 6.5)] = M.SNFH
    m[_ball(c, 4.2)] = M.ET
    m[_ball(c, 2.2)] = M.NETC
    m[_ball((c[0] - 4, 20, 18), 2.2)] = M.RC
    return m


@pytest.fixture(scope="module")
def phantoms24(tmp_path_factory):
    """Two small BraTS-2024 phantoms, made 'skull-stripped' (zero outside an ellipsoid) with a dark hole inside."""
    from common.phantom import make_phantoms

    root = tmp_path_factory.mktemp("ph24")
    make_phantoms(root, n=2, layout="brats2024", seed=0, shape=(48, 48, 32), progress=False)
    cases = []
    for case_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        cid = case_dir.name
        seg, affine, header = load_nifti(case_dir / f"{cid}-seg.nii.gz", dtype=None)
        brain = _ball((24, 24, 16), 0, seg.shape, radii=(20, 22, 15)) | (seg > 0)
        hole = _ball((14, 30, 16), 2.5, seg.shape) & (seg == 0)
        images = {}
        for c in CONTRASTS:
            img = load_nifti(case_dir / f"{cid}-{c}.nii.gz")[0]
            img = np.where(brain & ~hole, np.maximum(img, 1.0), 0.0).astype(np.float32)
            save_nifti(img, affine, case_dir / f"{cid}-{c}.nii.gz", header=header)
            images[c] = img
        cases.append({"id": cid, "seg": seg, "images": images, "brain": brain, "hole": hole, "affine": affine})
    return root, cases


def test_six_label_head_from_images_fills_holes_and_converts_back(phantoms24):
    _, cases = phantoms24
    for case in cases:
        six = M.to_six_label(case["seg"], [case["images"][c] for c in CONTRASTS], "brats2024")
        assert set(np.unique(six)) <= set(range(6)) and (six == M.HEAD).any()
        tumor = case["seg"] > 0
        assert np.array_equal(six[tumor], case["seg"][tumor] + 1)  # NETC 1->2, SNFH 2->3, ET 3->4, RC 4->5
        assert (six[case["hole"]] == M.HEAD).all(), "the dark hole inside the head must be filled"
        head, expected = six > 0, case["brain"] | case["hole"]
        assert (head >= expected).all() and (head & ~expected).sum() < 0.01 * expected.sum()  # closing: a few more
        assert np.array_equal(M.from_six_label(six, "brats2024"), case["seg"])
        assert not M.input_problems(six)
    with pytest.raises(DataError, match="lose"):
        M.from_six_label(six, "brats2023")  # RC has no place in BraTS 2023 labels


def test_check_mask_accepts_a_plausible_mask_and_names_each_problem():
    good = constructed_mask()
    assert M.check_mask(good) == []
    cases = {}
    m = good.copy(); m[_ball((12, 12, 15), 1.5)] = 0; cases["holes"] = m
    m = good.copy(); m[8, 20, 15] = M.ET; cases["stray voxels"] = m
    m = good.copy(); m[m == M.HEAD] = 0; m[_ball((20, 20, 15), 0, radii=(17, 17, 13)) & (m == 0)] = 0
    m[2:5, 2:5, 2:5] = M.HEAD; cases["disconnected"] = m
    m = good.copy(); m[_ball((20, 20, 15), 0, radii=(17, 17, 13)) & ~_ball((20, 20, 15), 0, radii=(16, 16, 12))] = 0
    m[m > 0] = np.where(m[m > 0] == 0, M.HEAD, m[m > 0]); m[_ball((21, 20, 15), 0, radii=(17, 7, 7)) & (m > 0)] = M.SNFH
    cases["head's outside"] = m
    m = good.copy(); m[m == M.SNFH] = M.HEAD; m[m == M.ET] = M.HEAD; m[m == M.RC] = M.HEAD
    cases["NETC outside the tumor core"] = m
    for expected, mask in cases.items():
        problems = M.check_mask(mask)
        assert any(expected in p for p in problems), (expected, problems)
    assert any("scheme" in p for p in M.check_mask(np.where(good == M.RC, 7, good)))
    assert any("3-D" in p for p in M.check_mask(good[None]))
    assert any("no head" in p for p in M.check_mask(np.where(good == M.HEAD, 0, good)))
    outside = np.zeros(GRID, np.uint8); outside[5:35, 5:35, 5:25] = M.HEAD; outside[0:4, 0:8, 0:8] = M.SNFH
    assert any("tumor outside the head" in p for p in M.input_problems(outside))


def test_augmented_masks_are_new_valid_and_reproducible(phantoms24):
    _, cases = phantoms24
    sources = [constructed_mask(), M.to_six_label(cases[0]["seg"], [cases[0]["images"][k] for k in CONTRASTS])]
    for k, src in enumerate(sources):
        masks, stats = M.augment_mask(src, n=2, seed=0, case_id=f"c{k}")
        assert len(masks) == 2 and stats["accepted"] == 2 and stats["failed"] == 0
        assert stats["tries"] == stats["accepted"] + stats["rejected"]
        assert sum(stats["reasons"].values()) >= stats["rejected"]
        for m in masks:
            assert m.shape == src.shape and m.dtype == np.uint8
            assert M.check_mask(m, margin=stats["margin"]) == []
            assert not np.array_equal(m, src)
            # the tumor keeps a plausible size (compartment resizing stays within a factor of about 2)
            ratio = np.isin(m, M.TUMOR).sum() / np.isin(src, M.TUMOR).sum()
            assert 0.4 < ratio < 2.5, ratio
        again, _ = M.augment_mask(src, n=2, seed=0, case_id=f"c{k}")
        assert all(np.array_equal(a, b) for a, b in zip(masks, again))
        other, _ = M.augment_mask(src, n=1, seed=1, case_id=f"c{k}")
        assert not np.array_equal(other[0], masks[0])
    # the tumor really moves and the edema really changes over draws
    src = sources[0]
    masks, _ = M.augment_mask(src, n=3, seed=3, case_id="move")
    centroids = [np.argwhere(np.isin(m, M.TUMOR)).mean(0) for m in masks]
    assert max(np.linalg.norm(c - np.argwhere(np.isin(src, M.TUMOR)).mean(0)) for c in centroids) > 1.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tools", "augment-masks", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_writes_valid_masks_on_the_source_grid_with_previews_and_counts(tmp_path):
    affine = np.diag([1.2, 1.2, 1.5, 1.0]); affine[:3, 3] = (-24, -20, 7)
    src_dir = tmp_path / "masks"
    for k in range(2):
        save_nifti(constructed_mask(dx=k), affine, src_dir / f"BraTS-GLI-0200{k}-100-seg.nii.gz", dtype=np.uint8)
    res = _cli("--masks", str(src_dir), "--out", str(tmp_path / "aug"), "--n", "2", "--seed", "0")
    assert res.returncode == 0, res.stderr
    written = sorted((tmp_path / "aug").glob("*-seg.nii.gz"))
    assert [p.name for p in written] == [f"BraTS-GLIAUG{s}-0200{k}-100-seg.nii.gz" for s in ("AA", "AB") for k in range(2)]
    summary = json.loads((tmp_path / "aug" / "augment_masks.json").read_text())
    margins = {new: c["margin"] for c in summary["cases"].values() for new in c["outputs"]}
    for p in written:
        labels, a, header = load_nifti(p, dtype=None)
        assert np.allclose(a, affine) and open_nifti(p).header.get_zooms() == (1.2, 1.2, 1.5)
        assert M.check_mask(labels, margin=margins[p.name[: -len("-seg.nii.gz")]]) == []
    assert summary["written"] == 4 and summary["failed"] == 0
    assert summary["rejected"] == sum(c["rejected"] for c in summary["cases"].values())
    assert all((tmp_path / "aug" / "previews" / f"BraTS-GLI-0200{k}-100.png").stat().st_size > 5000 for k in range(2))
    # two worker processes write the same files
    M.augment_masks(src_dir, tmp_path / "aug2", n=2, seed=0, workers=2, previews=False, progress=False)
    assert all((tmp_path / "aug2" / p.name).read_bytes() == p.read_bytes() for p in written)
    # the augmented masks feed the dataset layer as BraTS 2024 cases
    from common.generation.sources import collect_masks

    assert [cid for cid, _ in collect_masks(tmp_path / "aug")][0] == "BraTS-GLIAUGAA-02000-100"


def test_bad_masks_are_named_and_nothing_is_written(tmp_path):
    good = constructed_mask()
    bad = {
        "labels7": np.where(good == M.RC, 7, good).astype(np.uint8),
        "nohead": np.where(good == M.HEAD, 0, good).astype(np.uint8),
        "fourd": np.stack([good, good], -1),
    }
    outside = np.zeros(GRID, np.uint8); outside[5:35, 5:35, 5:25] = M.HEAD; outside[0:4, 0:8, 0:8] = M.SNFH
    bad["outside"] = outside
    src = tmp_path / "masks"
    save_nifti(good, np.eye(4), src / "ok-seg.nii.gz", dtype=np.uint8)
    for name, arr in bad.items():
        save_nifti(arr, np.eye(4), src / f"{name}-seg.nii.gz", dtype=np.uint8)
    (src / "broken-seg.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(DataError) as err:
        M.augment_masks(src, tmp_path / "out", n=1, progress=False)
    msg = str(err.value)
    for name, problem in [("labels7", "not in scheme"), ("nohead", "no head"), ("fourd", "3-D"),
                          ("outside", "tumor outside the head"), ("broken", "unreadable")]:
        assert f"{name}-seg.nii.gz: " in msg and problem in msg.split(f"{name}-seg.nii.gz: ")[1].split("\n")[0], name
    assert "ok-seg" not in msg
    assert not (tmp_path / "out").exists()
    res = _cli("--masks", str(src / "nohead-seg.nii.gz"), "--out", str(tmp_path / "out2"))
    assert res.returncode != 0 and "nohead-seg.nii.gz" in res.stderr and "no head" in res.stderr
    assert not (tmp_path / "out2").exists()
