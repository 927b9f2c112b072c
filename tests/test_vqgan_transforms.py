"""ROI chain of the VQGAN + masked transformer bundle: crop centred on the tumour, masked, [-1, 1], grade class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.layouts import read_layout
from common.io import DataError, load_nifti, save_nifti
from common.vqgan_transformer.networks import CLASSES
from common.vqgan_transformer.transforms import GradeLabeld, roi_transforms, save_roi_workflow


def _raises_data_error(fn, match: str) -> DataError:
    """MONAI's Compose wraps a transform's error in RuntimeError("applying transform ..."): find the DataError."""
    with pytest.raises(Exception) as info:
        fn()
    exc = info.value
    while exc is not None and not isinstance(exc, DataError):
        exc = exc.__cause__
    assert isinstance(exc, DataError), f"no DataError in the chain of {info.value!r}"
    assert match in str(exc)
    return exc


@pytest.fixture(scope="module")
def items(phantom_root):
    return read_layout(phantom_root)


def test_roi_chain_crops_masks_scales_and_labels(items):
    chain = roi_transforms(roi_size=(32, 32, 32))
    seen = set()
    for item in items:
        d = chain(item)
        img, lab = torch.as_tensor(d["image"]), torch.as_tensor(d["label"])
        assert img.shape == (1, 32, 32, 32) and lab.shape == (1, 32, 32, 32)
        inside = lab > 0
        assert inside.any()
        assert torch.all(img[~inside] == -1.0)  # multiplied by the binarised segmentation
        assert float(img[inside].min()) == pytest.approx(-1.0) and float(img[inside].max()) == pytest.approx(1.0)
        # the box is centred on the tumour: its bounding box centre lies at the ROI centre (+- 1 voxel)
        coords = torch.nonzero(inside[0])
        centre = (coords.min(0).values + coords.max(0).values + 1) / 2
        full = np.argwhere(load_nifti(item["label"])[0] > 0)
        if np.all(full.max(0) - full.min(0) + 1 < 32):  # the whole tumour fits in the box
            assert torch.all((centre - 16).abs() <= 1.0)
        assert int(d["class"]) == CLASSES.index(item["grade"])
        seen.add(item["grade"])
    assert seen == {"HGG", "LGG"}


def test_roi_larger_than_volume_is_padded(items):
    d = roi_transforms(roi_size=(80, 80, 48))(items[0])
    assert tuple(d["image"].shape) == (1, 80, 80, 48)
    assert int((torch.as_tensor(d["label"]) > 0).sum()) == int((load_nifti(items[0]["label"])[0] > 0).sum())


def test_case_without_grade_is_a_clear_error_before_reading(items):
    item = dict(items[0], grade=None, t2f="/nonexistent/flair.nii.gz")
    err = _raises_data_error(lambda: roi_transforms(roi_size=(32, 32, 32))(item), "no grade")
    assert item["id"] in err.where
    with pytest.raises(DataError, match="not one of"):
        GradeLabeld()({"id": "x", "grade": "GBM"})
    assert int(GradeLabeld(required=False)({"grade": ""})["class"]) == -1
    assert int(GradeLabeld()({"grade": " hgg "})["class"]) == CLASSES.index("HGG")


def test_roi_without_tumour_is_a_clear_error(items, tmp_path):
    item = dict(items[0])
    label, affine, _ = load_nifti(item["label"])
    empty = tmp_path / "empty-seg.nii.gz"
    save_nifti(np.zeros_like(label), affine, empty)
    item["label"] = str(empty)
    err = _raises_data_error(lambda: roi_transforms(roi_size=(32, 32, 32))(item), "no tumour voxels")
    assert item["id"] in err.where


def test_workflow_picture(items, tmp_path):
    out = save_roi_workflow(items[0], tmp_path / "workflow.png", roi_size=(32, 32, 32))
    import matplotlib.image as mpimg

    picture = mpimg.imread(out)
    assert picture.shape[1] > picture.shape[0]  # four panels side by side, three planes
    assert picture[..., :3].std() > 0.05


def test_importance_picture(items, tmp_path, one_torch_thread):
    from common.vqgan_transformer.networks import ImportanceVQGAN, build_vqgan
    from common.vqgan_transformer.transforms import save_importance_maps

    chain = roi_transforms(roi_size=(16, 16, 16))
    rois = torch.stack([torch.as_tensor(chain(item)["image"]) for item in items[:2]])
    torch.manual_seed(0)
    vqgan = ImportanceVQGAN(build_vqgan(channels=(8, 8), num_res_layers=1, num_embeddings=16, embedding_dim=8),
                            head_channels=8).eval()
    out = save_importance_maps(vqgan, rois, [items[0]["grade"], items[1]["grade"]], tmp_path / "importance.png")
    import matplotlib.image as mpimg

    assert mpimg.imread(out).shape[1] > 600  # four panels
