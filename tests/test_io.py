"""Atomic writes and loud reads: the guarantees every command relies on."""

import nibabel as nib
import numpy as np
import pytest

from common.io import DataError, atomic_path, load_nifti, save_json, save_nifti, torch_load, torch_save


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "result.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_path_keeps_old_file_until_success(tmp_path):
    target = tmp_path / "a.json"
    save_json({"v": 1}, target)
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise ValueError
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()


def test_outputs_get_normal_permissions(tmp_path):
    import os

    path = save_json({"a": 1}, tmp_path / "x.json")
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_nifti_round_trip_keeps_affine(tmp_path):
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [10, 20, -5]
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    path = save_nifti(data, affine, tmp_path / "x.nii.gz")
    back, aff, _ = load_nifti(path)
    np.testing.assert_allclose(back, data)
    np.testing.assert_allclose(aff, affine)


@pytest.mark.parametrize(
    "make_bad, expected",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"not a nifti at all" * 20), "unreadable"),
        (
            lambda p: nib.save(nib.Nifti1Image(np.full((3, 3, 3), np.nan, np.float32), np.eye(4)), str(p)),
            "NaN",
        ),
    ],
)
def test_load_nifti_errors_name_file_and_problem(tmp_path, make_bad, expected):
    path = tmp_path / "case_007_t2f.nii.gz"
    make_bad(path)
    with pytest.raises(DataError) as err:
        load_nifti(path)
    assert "case_007_t2f.nii.gz" in str(err.value)
    assert expected in str(err.value)


class _Custom:
    pass


def test_torch_checkpoint_round_trip_is_weights_only(tmp_path):
    import torch

    state = {"w": torch.arange(4.0), "epoch": 3}
    torch_save(state, tmp_path / "ckpt.pt")
    back = torch_load(tmp_path / "ckpt.pt")
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])

    torch.save({"obj": _Custom()}, tmp_path / "evil.pt")  # arbitrary objects must not unpickle
    with pytest.raises(DataError, match="evil.pt"):
        torch_load(tmp_path / "evil.pt")
