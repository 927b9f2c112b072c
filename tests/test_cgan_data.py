"""Slice sampling of the cGAN imputation bundle: batch samples, brain-only slices, lesion mask, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cgan_imputation.data import apply_chain, check_task, slice_dataloader, train_transforms, volume_transforms
from common.data import read_layout
from common.io import DataError, load_nifti, save_nifti


@pytest.fixture(scope="module")
def items(phantom_root):
    return read_layout(phantom_root)


def test_batches_hold_batch_size_times_batch_samples_slices(items):
    loader = slice_dataloader(items[:4], "t2w", "t2f", batch_size=2, batch_samples=3, spatial_size=(256, 256))
    batch = next(iter(loader))
    assert batch["source"].shape == (6, 1, 256, 256)
    assert batch["target"].shape == batch["mask"].shape == (6, 1, 256, 256)
    assert type(batch["source"]) is torch.Tensor  # plain tensors, no 3-D affine on 2-D slices
    for key in ("source", "target"):
        assert batch[key].min() >= 0 and batch[key].max() <= 1
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert len(set(batch["id"])) == 2  # two volumes per batch


def test_slices_have_brain_and_the_right_lesion_mask(items):
    item = next(it for it in items if load_nifti(it["label"])[0].any())
    chain = train_transforms(("t1c", "t2w"), "t2f", batch_samples=8, spatial_size=(64, 64), min_brain_fraction=0.1)
    samples = chain(dict(item))
    assert len(samples) == 8
    label, _, _ = load_nifti(item["label"])
    t2w, _, _ = load_nifti(item["t2w"])
    for s in samples:
        z = s["slice"]
        assert s["source"].shape == (2, 64, 64)  # two acquired contrasts as channels
        assert (t2w[..., z] != 0).mean() >= 0.1  # only slices holding brain
        np.testing.assert_array_equal(s["mask"][0].numpy(), (label[..., z] > 0).astype(np.float32))
    whole = volume_transforms(("t2w",), "t2f")(dict(item))
    brain_values = whole["target"][whole["brain"].bool()]
    assert float(brain_values.max()) == 1.0 and float(torch.quantile(brain_values, 0.5)) < 1.0  # 99.5 % -> 1


def test_sampling_is_seeded(items):
    a = [s["slice"] for s in train_transforms("t2w", "t2f", batch_samples=4, seed=3)(dict(items[0]))]
    b = [s["slice"] for s in train_transforms("t2w", "t2f", batch_samples=4, seed=3)(dict(items[0]))]
    assert a == b


def test_task_errors_name_the_flag():
    assert check_task("t1c,t2w", "t1n") == (("t1c", "t2w"), "t1n")
    with pytest.raises(DataError, match="--target.*also a source"):
        check_task("t2w", "t2w")
    with pytest.raises(DataError, match="--source.*unknown"):
        check_task("flair", "t1n")


def test_missing_source_and_mask_on_another_grid_name_the_file(items, tmp_path):
    item = dict(items[0])
    case = tmp_path / "case"
    shutil.copytree(Path(item["t2w"]).parent, case)
    item = {k: (str(case / Path(v).name) if k in ("t1n", "t1c", "t2w", "t2f", "label") else v)
            for k, v in item.items()}
    (case / Path(item["t2w"]).name).unlink()
    with pytest.raises(DataError, match="t2w.nii.gz: source contrast t2w"):
        apply_chain(train_transforms("t2w", "t2f"), item)
    label, affine, header = load_nifti(item["label"])
    save_nifti(label[:-2], affine, item["label"], header=header)
    with pytest.raises(DataError, match="seg.nii.gz: shape"):
        apply_chain(train_transforms("t1c", "t2f"), item)
