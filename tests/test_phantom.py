"""The phantom's physics, anatomy, tumours, determinism and BraTS layouts (small grids, same field of view)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from common.phantom import LABELS, TISSUE_NAMES, case_seed, default_grade, generate_case, make_phantoms
from common.phantom.anatomy import FOV_MM, brats_affine

SHAPE = (96, 96, 64)  # 2.5 mm voxels over the BraTS 240x240x155 mm field of view
TINY = (48, 48, 32)


def tissue(case, name):
    """Voxels dominated by one tissue, eroded once so partial-volume edges do not blur the means."""
    mask = case.tissue_label == TISSUE_NAMES.index(name)
    return ndi.binary_erosion(mask) if name in ("csf", "gm", "wm") and ndi.binary_erosion(mask).sum() > 50 else mask


def median(img, mask):
    assert mask.sum() > 20, "too few voxels to measure"
    return float(np.median(img[mask]))


@pytest.fixture(scope="module")
def hgg():
    return generate_case(3, grade="HGG", shape=SHAPE)


@pytest.fixture(scope="module")
def healthy():
    return generate_case(3, grade="HGG", shape=SHAPE, tumor=False)


def test_contrasts_follow_relaxation_physics(hgg):
    im = hgg.images
    csf, gm, wm = tissue(hgg, "csf"), tissue(hgg, "gm"), tissue(hgg, "wm")
    # FLAIR nulls CSF; T2 makes it the brightest tissue
    assert median(im["t2f"], csf) < 0.6 * median(im["t2f"], wm)
    assert median(im["t2w"], csf) > 1.5 * median(im["t2w"], wm)
    # T1: white matter brighter than grey matter brighter than CSF; T2 the reverse
    assert median(im["t1n"], wm) > 1.2 * median(im["t1n"], gm) > 1.2 * median(im["t1n"], csf)
    assert median(im["t2w"], gm) > 1.1 * median(im["t2w"], wm)
    # fat (scalp) bright on T1, cortical bone dark everywhere
    fat, bone = tissue(hgg, "fat"), tissue(hgg, "bone")
    assert median(im["t1n"], fat) > median(im["t1n"], wm)
    for c in im:
        assert median(im[c], bone) < median(im[c], fat)


def test_tumour_compartments_have_their_own_signal(hgg):
    im, lab = hgg.images, hgg.label
    et, netc, edema = lab == LABELS["et"], lab == LABELS["netc"], lab == LABELS["snfh"]
    wm = tissue(hgg, "wm")
    # gadolinium shortens T1 where the blood-brain barrier leaks: the rim lights up on t1c only
    assert median(im["t1c"], et) > 1.8 * median(im["t1n"], et)
    assert median(im["t1c"], et) > 1.3 * median(im["t1c"], wm)
    assert median(im["t1c"], netc) < median(im["t1c"], et)
    # oedema: long T1 and T2, bright on FLAIR and T2, dark-ish on T1
    assert median(im["t2f"], edema) > 1.4 * median(im["t2f"], wm)
    assert median(im["t2w"], edema) > 1.4 * median(im["t2w"], wm)
    assert median(im["t1n"], edema) < median(im["t1n"], wm)


def test_labels_only_inside_the_brain_and_head_around_it(hgg):
    assert hgg.label.dtype == np.uint8 and hgg.brain_mask.dtype == bool and hgg.head_mask.dtype == bool
    assert set(np.unique(hgg.label)) <= {0, 1, 2, 3}  # no cavity before treatment
    assert {1, 2, 3} <= set(np.unique(hgg.label))
    assert not (hgg.label > 0)[~hgg.brain_mask].any()
    assert not hgg.brain_mask[~hgg.head_mask].any()
    head_only = hgg.head_mask & ~hgg.brain_mask
    assert head_only.sum() > 0.3 * hgg.brain_mask.sum()  # skull, muscle, fat, skin: a real "head" label
    air = ~ndi.binary_dilation(hgg.head_mask, iterations=2)
    assert median(hgg.images["t1n"], head_only) > 3 * median(hgg.images["t1n"], air)
    # Rician noise: air is not exactly zero and values are non-negative integers (scanner-like)
    for img in hgg.images.values():
        assert img.dtype == np.float32 and img.min() >= 0 and np.all(img == np.rint(img))
        assert img[air].mean() > 0


def test_post_treatment_case_has_a_fluid_cavity():
    case = generate_case(5, grade="HGG", shape=SHAPE, post_treatment=True)
    rc = case.label == LABELS["rc"]
    assert rc.sum() > 50 and case.post_treatment
    wm = tissue(case, "wm")
    # fluid: bright on T2, (partly) nulled by FLAIR's inversion, no enhancement
    t2_ratio = median(case.images["t2w"], rc) / median(case.images["t2w"], wm)
    flair_ratio = median(case.images["t2f"], rc) / median(case.images["t2f"], wm)
    assert t2_ratio > 2.0 and flair_ratio < 0.7 * t2_ratio
    assert median(case.images["t1c"], rc) < 1.3 * median(case.images["t1n"], rc)


def test_hgg_and_lgg_differ():
    def stats(case):
        core = np.isin(case.label, (LABELS["netc"], LABELS["et"]))
        enh = float(np.mean(case.images["t1c"][core]) / np.mean(case.images["t1n"][core]))
        return (case.label == LABELS["et"]).sum() / max(core.sum(), 1), enh

    for seed in (1, 2):
        h = stats(generate_case(seed, grade="HGG", shape=(64, 64, 40)))
        low = stats(generate_case(seed, grade="LGG", shape=(64, 64, 40)))
        assert h[0] > 0.3 > low[0], (h, low)  # enhancing share of the tumour core
        assert h[1] > low[1] + 0.4, (h, low)  # mean t1c / t1n over the core


def test_mass_effect_pushes_tissue_away_from_the_tumour(hgg, healthy):
    """Outside the lesion, tissue came from closer to the tumour centre (pushed aside, not painted over)."""
    assert healthy.label.max() == 0 and not healthy.lesions
    les = hgg.lesions[0]
    spacing = np.array(FOV_MM) / np.array(SHAPE)
    grid = np.indices(SHAPE).astype(np.float32)
    v = (grid - np.array(les["centre_voxel"], np.float32)[:, None, None, None]) * spacing[:, None, None, None]
    r = np.sqrt((v**2).sum(0))
    both_brain = hgg.brain_mask & healthy.brain_mask
    near = (r > 5) & (r < les["r_edema_mm"] + 25) & (hgg.label == 0) & both_brain
    far = both_brain & (r > np.percentile(r[both_brain], 90))
    a, b = hgg.images["t1n"], healthy.images["t1n"]
    assert np.abs(a[near] - b[near]).mean() > 4 * np.abs(a[far] - b[far]).mean()

    def mismatch(shift_mm):  # healthy image sampled shift_mm closer to the centre
        pos = grid[:, near] - shift_mm * v[:, near] / r[near] / spacing[:, None]
        return np.abs(a[near] - ndi.map_coordinates(b, pos, order=1)).mean()

    assert mismatch(3.0) < 0.8 * mismatch(-3.0)


def test_same_seed_same_case_and_smaller_grids_keep_the_field_of_view():
    a = generate_case(11, shape=TINY)
    b = generate_case(11, shape=TINY)
    c = generate_case(12, shape=TINY)
    for k in a.images:
        np.testing.assert_array_equal(a.images[k], b.images[k])
    np.testing.assert_array_equal(a.label, b.label)
    assert a.grade == b.grade == default_grade(11)
    assert not np.array_equal(a.images["t1n"], c.images["t1n"])
    np.testing.assert_allclose(np.abs(np.diag(a.affine)[:3]), np.array(FOV_MM) / np.array(TINY))
    np.testing.assert_allclose(a.affine, brats_affine(TINY))
    # the 1 mm grid is exactly BraTS's SRI24 affine; coarse grids cover the same box
    np.testing.assert_allclose(brats_affine((240, 240, 155)), [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    for shape in ((240, 240, 155), TINY):
        aff = brats_affine(shape)
        corners = [aff @ np.array([i * (n - 1) for i, n in zip(c3, shape)] + [1]) for c3 in ((0, 0, 0), (1, 1, 1))]
        extent = np.abs(corners[1] - corners[0])[:3] + np.abs(np.diag(aff)[:3])
        np.testing.assert_allclose(extent, FOV_MM)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="grade"):
        generate_case(0, grade="GBM", shape=TINY)
    with pytest.raises(ValueError, match="shape"):
        generate_case(0, shape=(10, 10))
    with pytest.raises(ValueError, match="seed"):
        generate_case(-1, shape=TINY)


def test_written_layouts_read_back_and_cases_do_not_depend_on_n_or_workers(tmp_path):
    from common.data.layouts import read_layout
    from common.io import load_nifti

    few = make_phantoms(tmp_path / "a", n=2, layout="brats2019", seed=4, shape=TINY, workers=1, progress=False)
    more = make_phantoms(tmp_path / "b", n=3, layout="brats2019", seed=4, shape=TINY, workers=2, progress=False)
    items = read_layout(tmp_path / "b")
    assert len(items) == 3
    grades = [default_grade(case_seed(4, i)) for i in range(3)]
    assert sorted(it["grade"] for it in items) == sorted(grades)
    for p in few:  # same case index -> same folder and identical data
        q = tmp_path / "b" / p.relative_to(tmp_path / "a")
        for f in p.iterdir():
            np.testing.assert_array_equal(load_nifti(f)[0], load_nifti(q / f.name)[0])
    arr, aff, _ = load_nifti(next(p for p in few[0].iterdir() if p.name.endswith("_t1.nii.gz")))
    assert arr.shape == TINY
    np.testing.assert_allclose(aff, brats_affine(TINY), atol=1e-5)


def test_brats2024_layout_keeps_the_resection_cavity_label(tmp_path):
    from common.data.layouts import read_layout
    from common.io import load_nifti

    make_phantoms(tmp_path, n=2, layout="brats2024", seed=1, shape=TINY, workers=1, progress=False)
    items = read_layout(tmp_path)
    labels = set()
    for it in items:
        labels |= set(np.unique(load_nifti(it["label"])[0]).astype(int))
    assert LABELS["rc"] in labels


def test_conftest_phantoms_are_a_readable_brats2023_set(phantom_root):
    from common.data.layouts import detect_layout, read_layout
    from common.io import load_nifti

    assert detect_layout(phantom_root) == "brats2023"
    items = read_layout(phantom_root)
    assert len(items) == 6 and {it["grade"] for it in items} <= {"HGG", "LGG"}
    seg = load_nifti(items[0]["label"])[0]
    flair = load_nifti(items[0]["t2f"])[0]
    assert seg.shape == flair.shape == (64, 64, 40) and set(np.unique(seg)) <= {0, 1, 2, 3}


def test_cli_writes_cases_and_reports_grades(tmp_path, capsys):
    from tools.phantoms import _parse_shape, phantoms

    assert _parse_shape("small") == (96, 96, 64) and _parse_shape(None) == (240, 240, 155)
    assert _parse_shape("48,48,32") == (48, 48, 32) and _parse_shape((48, 48, 32)) == (48, 48, 32)
    with pytest.raises(ValueError, match="shape"):
        _parse_shape("big")
    phantoms(tmp_path, n=1, shape="48,48,32", workers=1)
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "HGG" in out and "LGG" in out
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1
