"""Volume imputation: outputs exactly on the source grid, a synthetic sidecar, no overwrite, dataset datalist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.cgan_imputation.data import volume_transforms
from common.cgan_imputation.impute import impute_dataset, impute_volume, load_generator, save_generator
from common.cgan_imputation.networks import build_generator
from common.data import build_datalist, read_layout
from common.io import DataError
from helpers import assert_imputed_on_source_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def missing_flair(without_flair):
    """A copy of three phantom cases with their FLAIR deleted."""
    return without_flair(3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "t2w_t2f.pt"
    return save_generator(build_generator(1, "demo"), path, sources=["t2w"], target="t2f", spatial_size=[64, 64])


def test_imputed_dataset_sits_on_the_source_grid_and_validates(missing_flair, weights, one_torch_thread):
    records = impute_dataset(missing_flair, weights, "t2w", "t2f", batch=16, progress=False)
    assert len(records) == 3
    for rec in records:
        assert Path(rec["output"]).name.endswith("-t2f.nii.gz")
        assert_imputed_on_source_grid(rec["output"], rec["output"].replace("-t2f.", "-t2w."))
        side = json.loads(Path(rec["sidecar"]).read_text())
        assert side["synthetic"] is True and side["target"] == "t2f" and list(side["sources"]) == ["t2w"]
        assert side["weights"]["sha256"] and side["seed"] == 0 and side["settings"]["batch"] == 16
    datalist = build_datalist(missing_flair, missing_flair.parent / "datalist.json", folds=3, progress=False)
    assert len(datalist["training"]) + len(datalist["validation"]) == 3


def test_existing_target_is_never_overwritten_unless_asked(missing_flair, weights, phantom_root):
    case = sorted(missing_flair.iterdir())[1]
    acquired = case / f"{case.name}-t2f.nii.gz"
    shutil.copy2(phantom_root / case.name / acquired.name, acquired)
    before = acquired.read_bytes()
    with pytest.raises(DataError, match=r"t2f.nii.gz: already exists \(an acquired scan\); nothing was written"):
        impute_dataset(missing_flair, weights, "t2w", "t2f", progress=False)
    assert acquired.read_bytes() == before
    assert not list(missing_flair.rglob("*-t2f.json"))  # not even the other cases were written
    skipped = impute_dataset(missing_flair, weights, "t2w", "t2f", skip_existing=True, progress=False)
    assert sum(bool(r.get("skipped")) for r in skipped) == 1 and acquired.read_bytes() == before
    impute_dataset(case, weights, "t2w", "t2f", overwrite=True, progress=False)  # one case folder as input
    assert acquired.read_bytes() != before and (case / f"{case.name}-t2f.json").exists()


def test_missing_source_or_wrong_task_stops_before_writing(missing_flair, weights):
    case = sorted(missing_flair.iterdir())[2]
    (case / f"{case.name}-t2w.nii.gz").unlink()
    with pytest.raises(DataError, match="t2w.nii.gz: source contrast t2w"):
        impute_dataset(missing_flair, weights, "t2w", "t2f", progress=False)
    assert not list(missing_flair.rglob("*-t2f.nii.gz"))
    with pytest.raises(DataError, match="trained for t2w -> t2f"):
        impute_dataset(missing_flair, weights, "t1c", "t1n", progress=False)
    with pytest.raises(DataError, match="also a source"):
        impute_dataset(missing_flair, weights, "t2w", "t2w", progress=False)


def test_batches_and_padding_do_not_change_the_result(phantom_root, weights, one_torch_thread):
    generator, info = load_generator(weights)
    assert info["sources"] == ["t2w"] and info["spatial_size"] == [64, 64]
    data = volume_transforms(("t2w",), None)(dict(read_layout(phantom_root)[0]))
    one = impute_volume(generator, data["source"], batch=1, spatial_size=(64, 64))
    many = impute_volume(generator, data["source"], batch=16, spatial_size=(64, 64))
    assert one.shape == tuple(data["source"].shape[1:])
    np.testing.assert_allclose(one, many, atol=1e-5)
    cut = data["source"].clone()
    cut[..., :5] = 0  # slices without brain (raw phantoms have a noisy background everywhere)
    skipped = impute_volume(generator, cut, batch=16, spatial_size=(64, 64))
    every = impute_volume(generator, cut, batch=16, spatial_size=(64, 64), skip_empty=False)
    np.testing.assert_allclose(every, skipped, atol=1e-5)  # skipping empty slices changes nothing
    assert not skipped[..., :5].any() and skipped[..., 5:].any()
    # a bare state dict loads too (architecture read off the weights)
    bare = Path(weights).with_name("bare.pt")
    torch.save(generator.state_dict(), bare)
    again, _ = load_generator(bare)
    np.testing.assert_allclose(impute_volume(again, data["source"], batch=8, spatial_size=(64, 64)), one, atol=1e-5)


@pytest.mark.slow  # a fresh interpreter importing torch + MONAI: ~25 s on 2 loaded cores
def test_cli_imputes_a_case(missing_flair, weights):
    case = sorted(missing_flair.iterdir())[0]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "tools", "impute", "--input", str(case), "--weights", str(weights),
           "--source", "t2w", "--target", "t2f", "--batch", "8", "--progress", "false"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (case / f"{case.name}-t2f.nii.gz").exists() and "imputed t2f for 1 case" in done.stderr
