"""Issue 11: masks in scanner space in, outputs on that grid out (the bundle's own chain to the model grid and a
world-space resample back), so generated images overlay the mask they were drawn from."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.bundle import bundle_config, run_bundle


def _tumour_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean inside the tumour minus mean of the rest of the head (non-zero voxels)."""
    rest = (mask == 0) & (image != 0)
    return float(image[mask > 0].mean() - image[rest].mean())


def test_a_mask_on_the_model_grid_is_left_as_it_is():
    """The chain is a no-op on the model grid: same labels, same affine (what the strict path used to demand)."""
    import torch
    from monai.data import MetaTensor

    chain = bundle_config("brats_mri_ldm3d", ["inference.json", "demo.json"]).get_parsed_content("mask_preprocessing")
    grid = tuple(bundle_config("brats_mri_ldm3d", ["inference.json", "demo.json"])["spatial_size"])
    labels = np.zeros(grid, np.float32)
    labels[20:30, 25:35, 10:20] = 2
    affine = np.diag([-1.2, 1.2, 2.0, 1.0])
    affine[:3, 3] = (30, -40, 12)
    out = chain({"label": MetaTensor(torch.as_tensor(labels[None]), affine=torch.as_tensor(affine))})["label"]
    assert np.array_equal(np.asarray(out[0]), labels) and np.allclose(np.asarray(out.affine), affine)


@pytest.mark.slow  # a 240x240x155 phantom (~12 s) and one generation (~20 s)
def test_a_full_size_mask_generates_on_its_grid_with_the_tumour_bright_on_flair_and_t2(tmp_path, one_torch_thread):
    from common.phantom import make_phantoms

    (case,) = make_phantoms(tmp_path / "full", n=1, layout="brats2023", seed=7, shape=(240, 240, 155), progress=False)
    seg_path = next(case.glob("*-seg.nii.gz"))
    seg = nib.load(seg_path)
    mask = np.asarray(seg.dataobj)
    run_bundle("brats_mri_ldm3d", ["inference.json", "demo.json"], input=str(seg_path),
               output_dir=str(tmp_path / "gen"), num_inference_steps=10)
    folder = next((tmp_path / "gen").iterdir())
    for contrast in ("t1n", "t1c", "t2w", "t2f"):
        img = nib.load(next(folder.glob(f"*-{contrast}.nii.gz")))
        assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
        assert np.allclose(img.header.get_zooms()[:3], seg.header.get_zooms()[:3])
        if contrast in ("t2w", "t2f"):  # oedema and tumour are bright there, in z-score units of the head
            assert _tumour_contrast(img.get_fdata(), mask) > 0.5, contrast
    written = nib.load(next(folder.glob("*-seg.nii.gz")))
    assert np.array_equal(np.asarray(written.dataobj), mask) and np.allclose(written.affine, seg.affine)

    run_bundle("brats_mri_ldm3d", ["inference.json", "demo.json"], input=str(seg_path),
               output_dir=str(tmp_path / "model"), num_inference_steps=2, output_space="model")
    grid = tuple(bundle_config("brats_mri_ldm3d", ["inference.json", "demo.json"])["spatial_size"])
    img = nib.load(next((tmp_path / "model").rglob("*-t2f.nii.gz")))
    assert img.shape == grid


@pytest.mark.slow  # one GliomaGen demo generation (~15 s)
def test_a_gliomagen_mask_on_a_larger_grid_generates_on_that_grid(tmp_path, one_torch_thread):
    """A 6-label mask with margins the model grid lacks (shifted, larger field of view): cropped to its head by
    the bundle's chain, and the outputs resampled back so that the written mask is the input mask."""
    from common.bundle import phantom_datalist, prepare_cases

    configs = ["inference.json", "demo.json"]
    parser = bundle_config("brats_mri_gliomagen", configs)
    datalist = phantom_datalist(tmp_path / "cache", n=1, shape=tuple(parser["phantom_shape"]), seed=99, folds=1,
                                layout="brats2024", progress=False)
    (case,) = prepare_cases(datalist, tmp_path / "ref", "brats_mri_gliomagen", configs,
                            section=("training", "validation"), progress=False)
    on_grid = nib.load(case["label"])
    pad = ((5, 3), (4, 6), (2, 2))
    big = np.pad(np.asarray(on_grid.dataobj), pad)
    affine = on_grid.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in pad], float)  # the same head, more field of view
    mask = tmp_path / "BraTS-GLI-00099-000-seg.nii.gz"
    nib.save(nib.Nifti1Image(big, affine), str(mask))
    for space in ("input", "model"):  # the same seed: the same sample, laid out on two grids
        run_bundle("brats_mri_gliomagen", configs, input=str(mask), output_dir=str(tmp_path / space),
                   sampler="ddim", num_inference_steps=5, output_space=space)
    folder = next((tmp_path / "input").iterdir())
    flair = nib.load(next(folder.glob("*-t2f.nii.gz")))
    assert flair.shape == big.shape and np.allclose(flair.affine, affine)
    model = nib.load(next((tmp_path / "model").rglob("*-t2f.nii.gz")))
    assert model.shape == tuple(parser["spatial_size"])
    # the model grid is a whole-voxel shift of the input grid here (crop and pad, no zoom): compare voxel by voxel
    offset = np.rint(np.linalg.solve(affine, model.affine[:, 3])[:3]).astype(int)
    assert np.allclose(np.linalg.solve(affine, model.affine)[:3, :3], np.eye(3))
    src = tuple(slice(max(0, -o), min(m, b - o)) for o, m, b in zip(offset, model.shape, big.shape))
    dst = tuple(slice(s.start + o, s.stop + o) for s, o in zip(src, offset))
    assert np.allclose(flair.get_fdata()[dst], model.get_fdata()[src], atol=1e-4)
    outside = np.ones(big.shape, bool)
    outside[dst] = False
    assert np.abs(flair.get_fdata()[outside]).max() < 1e-4, np.abs(flair.get_fdata()[outside]).max()  # beyond the model field of view: nothing
    written = nib.load(next(folder.glob("*-seg.nii.gz")))
    assert np.array_equal(np.asarray(written.dataobj), big)
    record = json.loads((tmp_path / "input" / "generation.json").read_text())["samples"][0]
    assert record["source_id"] == "BraTS-GLI-00099-000"
