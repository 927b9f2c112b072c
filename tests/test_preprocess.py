"""FeTS-style preprocessing: realignment, bias flattening, atlas space, skull-strip choice, shards, resume, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from common.io import DataError, save_nifti
from common.preprocess import core
from common.preprocess.atlas import Atlas, load_atlas
from common.preprocess.pipeline import PreprocessConfig, preprocess_case
from common.preprocess.runner import parse_shard, select_shard
from common.preprocess.skullstrip import HDBetUnavailable, resolve_method

SHAPE = (80, 80, 52)  # the 240x240x155 mm BraTS field of view at 3 mm voxels
FAST = PreprocessConfig(spacing=3.0, registration_finest_mm=3.0)
MISALIGN_DEG = (6.0, -3.0, 9.0)
MISALIGN_MM = (4.0, -3.0, 2.5)


def coarse_atlas(spacing: float = 3.0) -> Atlas:
    """nilearn's MNI152 at 3 mm: same anatomy, 27x fewer voxels for the registration to visit."""
    full = load_atlas()
    grid = core.grid_like(full.image, spacing)
    return Atlas(f"MNI152 {spacing} mm", core.resample_to(full.image, grid),
                 core.resample_to(full.brain_mask, grid, nearest=True))


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def wm_cv(image: np.ndarray, wm: np.ndarray) -> float:
    values = image[wm]
    return float(values.std() / values.mean())


def carry_to_output(volume, volume_affine, record, contrast) -> np.ndarray:
    """Nearest-neighbour sample an input-space volume on the output grid through the *recorded* transforms."""
    out_affine = np.asarray(record["output_affine"])
    shape = record["output_shape"]
    ijk = np.indices(shape).reshape(3, -1)
    world = out_affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    world = np.asarray(record["transforms"]["atlas_to_reference"]) @ world
    world = np.asarray(record["transforms"]["reference_to_contrast"][contrast]) @ world
    src = np.linalg.inv(volume_affine) @ world
    return ndimage.map_coordinates(volume, src[:3], order=0, cval=0).reshape(shape)


@pytest.fixture(scope="module")
def atlas():
    return coarse_atlas()


@pytest.fixture(scope="module")
def phantom():
    from common.phantom import generate_case

    return generate_case(3, shape=SHAPE)


@pytest.fixture(scope="module")
def corrupted(phantom, atlas):
    """t2w rotated by ~11 degrees and shifted by ~5.6 mm; t1n under a strong extra bias field."""
    aff = phantom.affine
    t2w = core.to_sitk(phantom.images["t2w"], aff)
    move = sitk.Euler3DTransform()
    move.SetCenter(t2w.TransformContinuousIndexToPhysicalPoint([s / 2 for s in t2w.GetSize()]))
    move.SetRotation(*np.radians(MISALIGN_DEG))
    move.SetTranslation(MISALIGN_MM)
    misaligned = core.from_sitk(core.resample_to(t2w, t2w, move))[0]
    u = [(np.arange(n) - n / 2) / (n / 2) for n in SHAPE]
    x, y, z = np.meshgrid(*u, indexing="ij")
    bias = np.exp(0.45 * x - 0.3 * y + 0.25 * z + 0.2 * x * z).astype(np.float32)
    inputs = {c: (v, aff) for c, v in phantom.images.items()}
    inputs["t2w"] = (misaligned, aff)
    inputs["t1n"] = (phantom.images["t1n"] * bias, aff)
    result = preprocess_case(inputs, label=(phantom.label, aff), config=FAST, atlas=atlas, case_id="phantom-0")
    return {"inputs": inputs, "move": move, "result": result}


def test_sitk_conversion_keeps_world_coordinates():
    rng = np.random.default_rng(0)
    array = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.array([[0, 0, 2.0, 10], [-1.5, 0, 0, 3], [0, 1.2, 0, -4], [0, 0, 0, 1]])
    image = core.to_sitk(array, affine)
    back, back_affine = core.from_sitk(image)
    assert np.array_equal(back, array) and np.allclose(back_affine, affine)
    ras = affine @ [1, 2, 3, 1]
    assert np.allclose(image.TransformIndexToPhysicalPoint([1, 2, 3]), [-ras[0], -ras[1], ras[2]])  # LPS
    ras_array, ras_affine = core.reorient_to_ras(array, affine)
    assert np.all(np.diag(ras_affine)[:3] > 0) and np.count_nonzero(ras_affine[:3, :3]) == 3
    # the same world point holds the same value after reorientation
    world = affine @ [1, 2, 3, 1]
    i, j, k = np.rint(np.linalg.inv(ras_affine) @ world)[:3].astype(int)
    assert ras_array[i, j, k] == array[1, 2, 3]


def test_misaligned_contrast_is_realigned(corrupted, phantom):
    record = corrupted["result"].record
    recovered = np.asarray(record["transforms"]["reference_to_contrast"]["t2w"])
    truth = np.linalg.inv(core.euler_matrix_ras(corrupted["move"]))  # reference point -> misaligned t2w point
    assert core.rotation_error_deg(recovered, truth) < 1.0
    brain = np.argwhere(phantom.brain_mask)[::7]
    points = (phantom.affine @ np.c_[brain, np.ones(len(brain))].T)
    error_mm = np.linalg.norm((recovered @ points - truth @ points)[:3], axis=0)
    assert error_mm.mean() < 1.0, error_mm.mean()  # voxels are 3 mm
    # image evidence: undo the recovered transform and compare with the untouched t2w
    aff = phantom.affine
    original = phantom.images["t2w"]
    misaligned = corrupted["inputs"]["t2w"][0]
    grid = core.to_sitk(original, aff)
    moved = core.to_sitk(misaligned, aff)
    realigned = core.from_sitk(core.resample_to(moved, grid, core.rigid_from_ras(recovered)))[0]
    ideal = core.from_sitk(core.resample_to(moved, grid, core.rigid_from_ras(truth)))[0]  # same blur, exact transform
    head = ndimage.binary_erosion(phantom.head_mask, iterations=2)
    before, after, best = (ncc(v, original, head) for v in (misaligned, realigned, ideal))
    assert before < 0.7 and after > 0.9 and after > best - 0.01, (before, after, best)


def test_bias_field_is_flattened(corrupted, phantom):
    from common.phantom import TISSUE_NAMES

    wm = ndimage.binary_erosion(phantom.tissue_label == TISSUE_NAMES.index("wm"))
    biased = corrupted["inputs"]["t1n"][0]
    result = corrupted["result"]
    wm_out = carry_to_output(wm.astype(np.uint8), phantom.affine, result.record, "t1n") > 0
    wm_out &= ndimage.binary_erosion(wm_out)
    cv_before = wm_cv(biased, wm)
    cv_after = wm_cv(result.images["t1n"], wm_out)
    assert wm_out.sum() > 200
    assert cv_after < 0.5 * cv_before, (cv_before, cv_after)
    # as flat as the phantom before the extra field (whose own milder coil bias N4 removes as well)
    cv_clean = wm_cv(phantom.images["t1n"], wm)
    assert cv_after < 1.2 * cv_clean, (cv_clean, cv_after)
    assert record_range(result.record, "t1n") > 1.5 > record_range(result.record, "t1c")


def record_range(record, contrast) -> float:
    low, high = record["n4_bias_range"][contrast]
    return high / low


def test_outputs_are_atlas_space_cropped_and_stripped(corrupted, phantom, atlas):
    result = corrupted["result"]
    record = result.record
    assert record["skull_strip"] == "atlas"  # HD-BET is not installed here: the weight-free path is used
    shape = tuple(record["output_shape"])
    assert all(v.shape == shape for v in result.images.values()) and result.label.shape == shape
    assert np.allclose(np.abs(np.diag(result.affine)[:3]), 3.0)
    # cropped to the brain: the mask reaches within the margin of every face
    idx = np.argwhere(result.brain_mask)
    assert np.all(idx.min(axis=0) <= FAST.crop_margin) and np.all(idx.max(axis=0) >= np.array(shape) - 1 - FAST.crop_margin)
    for v in result.images.values():
        assert np.all(v[result.brain_mask == 0] == 0) and v[result.brain_mask > 0].mean() > 0
    # the label followed the reference's transform (nearest neighbour) and kept its values
    carried = carry_to_output(phantom.label, phantom.affine, record, "t1c")
    tumor_out, tumor_carried = result.label > 0, carried > 0
    dice = 2 * (tumor_out & tumor_carried).sum() / (tumor_out.sum() + tumor_carried.sum())
    assert dice > 0.95 and set(np.unique(result.label)) <= set(np.unique(phantom.label))
    # atlas registration: the phantom's brain (MNI anatomy, randomly posed) lands on the atlas brain
    brain_out = carry_to_output(phantom.brain_mask.astype(np.uint8), phantom.affine, record, "t1c") > 0
    grid = core.grid_like(atlas.image, 3.0)
    atlas_brain = core.crop(core.from_sitk(core.resample_to(atlas.brain_mask, grid, nearest=True))[0] > 0,
                            core.affine_of(grid), record["crop_box"])[0]
    dice_brain = 2 * (brain_out & atlas_brain).sum() / (brain_out.sum() + atlas_brain.sum())
    assert dice_brain > 0.85, dice_brain
    assert record["registration"]["atlas_brain_inside_head"] > 0.95


def test_normalisations():
    rng = np.random.default_rng(1)
    array = rng.normal(100, 20, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(array.shape, bool)
    mask[5:15, 5:15, 5:15] = True
    z, stats = core.normalise(array, mask, "zscore")
    assert abs(z[mask].mean()) < 1e-4 and abs(z[mask].std() - 1) < 1e-3 and np.all(z[~mask] == 0)
    assert stats["method"] == "zscore" and stats["std"] > 0
    p, _ = core.normalise(array, mask, "percentile")
    assert p.min() == 0 and p.max() == 1 and np.all(p[~mask] == 0)
    assert 0.4 < np.median(p[mask]) < 0.6
    n, _ = core.normalise(array, mask, "none")
    assert np.array_equal(n[mask], array[mask]) and np.all(n[~mask] == 0)
    with pytest.raises(ValueError, match="unknown normalisation"):
        core.normalise(array, mask, "minmax")


def test_hdbet_is_optional_and_explicit_request_fails_clearly(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "HD_BET" else real_find_spec(name, *a))
    assert resolve_method("auto") == "atlas"
    with pytest.raises(HDBetUnavailable, match="not installed"):
        resolve_method("hdbet")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    # installed but without its weights: auto falls back, explicit request names the missing file
    package = tmp_path / "HD_BET"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "paths.py").write_text(f"folder_with_parameter_files = {str(tmp_path / 'params')!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "HD_BET" or m.startswith("HD_BET.")]:
        monkeypatch.delitem(sys.modules, name)
    assert resolve_method("auto") == "atlas"
    with pytest.raises(HDBetUnavailable, match="weights are missing.*checkpoint_final.pth"):
        resolve_method("hdbet")
    # the dataset runner refuses before touching any case
    from common.preprocess.runner import preprocess_dataset

    with pytest.raises(HDBetUnavailable):
        preprocess_dataset(tmp_path / "nowhere", tmp_path / "out", config=PreprocessConfig(skull_strip="hdbet"))
    assert not (tmp_path / "out").exists()


def test_shards_partition_the_sorted_cases():
    ids = [f"BraTS-GLI-{i:05d}-000" for i in (7, 3, 9, 1, 4, 8, 2)]
    shards = [select_shard(ids, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(ids)
    assert shards[0] == sorted(ids)[0::3] and select_shard(list(reversed(ids)), 1, 3) == shards[1]
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) == (0, 1)
    for bad in ("5/5", "1-4", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_bad_input_names_the_case(phantom, atlas):
    images = {c: (v, phantom.affine) for c, v in phantom.images.items()}
    with pytest.raises(DataError, match="case-x.*reference contrast 't1c' is missing"):
        preprocess_case({c: v for c, v in images.items() if c != "t1c"}, config=FAST, atlas=atlas, case_id="case-x")
    images["t2f"] = (np.zeros(SHAPE, np.float32), phantom.affine)
    with pytest.raises(DataError, match="case-y.*t2f.*empty"):
        preprocess_case(images, config=FAST, atlas=atlas, case_id="case-y")


@pytest.mark.slow
def test_cli_shards_resume_and_failures(tmp_path, atlas, capsys):
    """End to end through `python -m tools preprocess`: two shards, a resumed rerun, then one broken case."""
    from common.data.layouts import read_layout
    from common.phantom import make_phantoms
    from tools.__main__ import main

    raw, out = tmp_path / "raw", tmp_path / "out"
    make_phantoms(raw, n=3, layout="brats2023", seed=5, shape=(48, 48, 32), progress=False)
    # any atlas file is accepted: the 3 mm MNI152 and its mask
    atlas_path, mask_path = tmp_path / "atlas.nii.gz", tmp_path / "atlas_mask.nii.gz"
    for image, path in ((atlas.image, atlas_path), (atlas.brain_mask, mask_path)):
        save_nifti(*core.from_sitk(image), path)
    flags = ["--atlas", str(atlas_path), "--atlas_mask", str(mask_path), "--spacing", "3",
             "--normalisation", "zscore", "--n4_resolution_mm", "10"]
    ids = [it["id"] for it in read_layout(raw, require_label=False)]

    main(["preprocess", "--input", str(raw), "--output", str(out), "--shard", "0/2", "--workers", "2", *flags])
    assert sorted(p.parent.name for p in out.glob("*/preprocess.json")) == ids[0::2]
    main(["preprocess", "--input", str(raw), "--output", str(out), "--shard", "1/2", *flags])
    items = read_layout(out)  # a BraTS 2023 dataset with labels, same case ids
    assert [it["id"] for it in items] == ids
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/preprocess.json")}
    record = json.loads((out / ids[0] / "preprocess.json").read_text())
    assert record["config"]["normalisation"] == "zscore" and record["skull_strip"] == "atlas"
    assert all((out / rel).is_file() for rel in record["outputs"])
    import matplotlib.pyplot as plt

    picture = plt.imread(out / "qc" / f"{ids[0]}.png")
    assert picture.ndim == 3 and picture.shape[0] > 200 and picture[..., :3].std() > 0.05
    capsys.readouterr()

    # resume: nothing left to do
    main(["preprocess", "--input", str(raw), "--output", str(out), *flags])
    assert "0 processed, 3 already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/preprocess.json")} == stamps

    # a broken case is named, the others are not redone, the exit status is non-zero
    broken = raw / "BraTS-GLI-00099-000"
    broken.mkdir()
    for c in ("t1n", "t1c", "t2w", "t2f"):
        (broken / f"BraTS-GLI-00099-000-{c}.nii.gz").write_bytes((raw / ids[0] / f"{ids[0]}-{c}.nii.gz").read_bytes())
    (broken / "BraTS-GLI-00099-000-t2w.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", "--input", str(raw), "--output", str(out), *flags])
    assert exit_info.value.code == 1
    text = capsys.readouterr().out
    assert "1 failed" in text and "FAILED BraTS-GLI-00099-000" in text and "unreadable image" in text
    assert not (out / "BraTS-GLI-00099-000").exists()
