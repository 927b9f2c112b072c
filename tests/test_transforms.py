"""Dictionary transforms: loading (also MSD 4-D), label schemes, scaling, ROI cropping, head labels."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common import CONTRASTS
from common.data.layouts import make_case_id, read_layout, write_case
from common.data.transforms import (
    AddHeadLabeld,
    ConvertLabelSchemed,
    LoadCanonicald,
    NonzeroPercentileScaled,
    RandScaleZeroPadd,
    TumorROId,
)
from common.io import DataError, save_nifti

SHAPE = (16, 16, 12)
AFFINE = np.diag([1.2, 1.2, 2.0, 1.0])
AFFINE[:3, 3] = [5.0, -3.0, 1.0]


def _case():
    rng = np.random.default_rng(0)
    images = {c: (rng.random(SHAPE) + 10 * k + 1).astype(np.float32) for k, c in enumerate(CONTRASTS)}
    label = np.zeros(SHAPE, np.uint8)
    label[4:10, 5:11, 3:8] = 2
    label[6:8, 7:9, 4:6] = 3
    return images, label


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory):
    """The same case written as brats2023 and as msd (4-D)."""
    images, label = _case()
    roots = {}
    for layout in ("brats2023", "msd"):
        root = tmp_path_factory.mktemp(layout)
        write_case(root, layout, make_case_id(layout, 0), images, AFFINE, label, "brats2023", "HGG")
        roots[layout] = read_layout(root)[0]
    return images, label, roots


def test_load_canonical_from_brats_and_msd(two_layouts):
    images, label, items = two_layouts
    loaded = {name: LoadCanonicald()(item) for name, item in items.items()}
    for name, d in loaded.items():
        img = d["image"]
        assert isinstance(img, MetaTensor) and img.shape == (4, *SHAPE) and img.dtype == torch.float32
        for k, c in enumerate(CONTRASTS):  # channel order = CONTRASTS, whatever the file order
            np.testing.assert_allclose(img[k].numpy(), images[c])
        np.testing.assert_allclose(img.affine.numpy(), AFFINE)
        assert d["label"].shape == (1, *SHAPE) and d["image"].meta["case_id"] == items[name]["id"]
    np.testing.assert_array_equal(loaded["brats2023"]["label"][0].numpy(), label)
    msd_label = np.select([label == 2, label == 3], [1, 3], 0)  # msd scheme: SNFH 1, ET 3
    np.testing.assert_array_equal(loaded["msd"]["label"][0].numpy(), msd_label)
    flair = LoadCanonicald(contrasts=("t2f",), label_key=None)(items["msd"])
    assert flair["image"].shape == (1, *SHAPE) and isinstance(flair["label"], str)  # label left as a path
    np.testing.assert_allclose(flair["image"][0].numpy(), images["t2f"])


def test_load_canonical_errors(two_layouts, tmp_path):
    images, label, items = two_layouts
    item = dict(items["brats2023"], label=None)
    with pytest.raises(DataError, match="no label"):
        LoadCanonicald()(item)
    images_only = LoadCanonicald(allow_missing_label=True)(dict(item, grade=None))
    assert "label" not in images_only and images_only["grade"] == ""  # None cannot be batched
    from monai.data import DataLoader, Dataset

    batch = next(iter(DataLoader(Dataset([item, item], LoadCanonicald(allow_missing_label=True)), batch_size=2)))
    assert batch["image"].shape == (2, 4, *SHAPE)
    bad = tmp_path / "t2w.nii.gz"
    save_nifti(np.ones((16, 16, 11), np.float32), AFFINE, bad)
    with pytest.raises(DataError, match=r"t2w.nii.gz.*shape \(16, 16, 11\)"):
        LoadCanonicald()(dict(items["brats2023"], t2w=str(bad)))
    with pytest.raises(DataError, match="does not exist"):
        LoadCanonicald()(dict(items["brats2023"], t1c=str(tmp_path / "gone.nii.gz")))


def test_convert_label_scheme_keeps_metatensor():
    label = MetaTensor(torch.tensor([[[[0.0, 1.0, 2.0, 4.0]]]]), affine=torch.eye(4) * 2)
    out = ConvertLabelSchemed("label", "brats2019", "six_label")({"label": label, "id": "c1"})["label"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.flatten().tolist() == [0, 2, 3, 4] and float(out.affine[0, 0]) == 2
    with pytest.raises(DataError, match="c1"):
        ConvertLabelSchemed("label", "brats2023", "brats2019")({"label": label, "id": "c1"})


def test_nonzero_percentile_scaling():
    img = torch.zeros(2, 10, 10, 10)
    img[0, :5] = torch.arange(1, 501, dtype=torch.float32).reshape(5, 10, 10)  # 1..500 on half, zero elsewhere
    img[1, :5] = 7.0
    out = NonzeroPercentileScaled("image", lower=0, upper=100, b_min=-1, b_max=1)({"image": img})["image"]
    assert float(out[0, :5].min()) == -1 and float(out[0, :5].max()) == 1
    assert (out[:, 5:] == -1).all()  # background stays b_min
    np.testing.assert_allclose(float(out[0, 0, 0, 1] - out[0, 0, 0, 0]), 2 / 499, rtol=1e-4)  # linear
    clipped = NonzeroPercentileScaled("image", lower=10, upper=90)({"image": img})["image"]
    assert float(clipped[0, :5].min()) == 0 and float(clipped[0, :5].max()) == 1
    assert int((clipped[0, :5] == 1).sum()) == pytest.approx(50, abs=1)  # the top 10 % saturate
    assert (clipped[1, :5] == 0).all()  # a constant channel does not divide by zero


def _blob_pair(shape=(20, 20, 10), box=((6, 14), (6, 14), (3, 7))):
    label = torch.zeros(1, *shape)
    sl = tuple(slice(a, b) for a, b in box)
    label[(0, *sl)] = 2
    image = label * 3.0
    return MetaTensor(image, affine=torch.eye(4)), MetaTensor(label, affine=torch.eye(4))


def _extent(mask: torch.Tensor):
    idx = torch.nonzero(mask)
    return (idx.max(0).values - idx.min(0).values + 1).tolist(), ((idx.max(0).values + idx.min(0).values) / 2).tolist()


def test_rand_scale_zero_pad_fit_geometry():
    image, label = _blob_pair()
    t = RandScaleZeroPadd(("image", "label"), spatial_size=(40, 40, 24), scale_range=(1.0, 1.0))
    out = t({"image": image, "label": label})
    assert out["image"].shape == (1, 40, 40, 24) and out["label"].shape == (1, 40, 40, 24)
    # fit: min(40/20, 40/20, 24/10) = 2 -> the 8x8x4 box becomes 16x16x8, centred
    size, centre = _extent(out["label"][0] > 0)
    assert size == [16, 16, 8]
    np.testing.assert_allclose(centre, [19.5, 19.5, 11.5], atol=1.0)
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 2.0}  # nearest keeps label values
    np.testing.assert_array_equal((out["image"][0] > 1.5).numpy(), (out["label"][0] > 0).numpy())  # aligned
    assert float(out["image"][0, 0, 0, 0]) == 0  # zero padding


def test_rand_scale_zero_pad_random_factor():
    image, label = _blob_pair()
    t = RandScaleZeroPadd(("image", "label"), spatial_size=(20, 20, 10), scale_range=(0.5, 0.75), fit=False)
    sizes = []
    for seed in (0, 1):
        t.set_random_state(seed)
        out = t({"image": image, "label": label})
        assert 0.5 <= t.factor <= 0.75 and out["label"].shape == (1, 20, 20, 10)
        size, centre = _extent(out["label"][0] > 0)
        assert abs(size[0] - 8 * t.factor) <= 1.01
        np.testing.assert_allclose(centre, [9.5, 9.5, 4.5], atol=1.0)
        sizes.append(t.factor)
    t.set_random_state(0)
    t({"image": image, "label": label})
    assert t.factor == sizes[0]  # reproducible
    no_draw = RandScaleZeroPadd(("image", "label"), (20, 20, 10), scale_range=(0.5, 0.75), fit=False, prob=0.0)
    out = no_draw({"image": image, "label": label})
    torch.testing.assert_close(out["label"].as_tensor(), label.as_tensor())


def test_tumor_roi_centred_masked_scaled():
    shape = (30, 30, 20)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, *shape)).astype(np.float32) + 1)
    label = torch.zeros(1, *shape)
    label[0, 1:7, 20:26, 8:12] = 2  # tumour near the x border: the box must be zero-padded there
    label[0, 3:5, 22:24, 9:11] = 3
    out = TumorROId("image", roi_size=(16, 16, 16))({"image": MetaTensor(image), "label": MetaTensor(label)})
    img, lab = out["image"], out["label"]
    assert img.shape == (1, 16, 16, 16) and lab.shape == (1, 16, 16, 16)
    size, centre = _extent(lab[0] > 0)
    assert size == [6, 6, 4]
    np.testing.assert_allclose(centre, [7.5, 7.5, 7.5], atol=0.5)
    inside = lab[0] > 0
    assert float(img[0][inside].min()) == -1 and float(img[0][inside].max()) == 1
    assert (img[0][~inside] == -1).all()
    # the cropped intensities are the original ones, linearly rescaled (same order)
    original = image[0][label[0] > 0]
    assert torch.allclose(torch.sort(img[0][inside]).values,
                          (torch.sort(original).values - original.min()) / (original.max() - original.min()) * 2 - 1,
                          atol=1e-5)
    with pytest.raises(DataError, match="no tumour"):
        TumorROId("image")({"image": MetaTensor(image), "label": MetaTensor(torch.zeros(1, *shape)), "id": "c9"})


def test_add_head_label_fills_holes_and_keeps_tumor():
    shape = (24, 24, 16)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([11.5, 11.5, 7.5])[:, None, None, None]
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    head = radius < 7
    image = np.zeros((2, *shape), np.float32)
    image[0][head] = 1.0
    image[1][head] = 2.0
    image[:, radius < 3] = 0  # a dark cavity inside the head (e.g. CSF after normalisation)
    label = np.zeros((1, *shape), np.float32)
    label[0, 10:13, 10:13, 6:9] = 4  # brats2024 resection cavity, overlapping the dark hole
    label[0, 14:16, 11:13, 7:9] = 3  # ET
    out = AddHeadLabeld("label", src_scheme="brats2024", closing_iterations=0)(
        {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
    )["label"][0].numpy()
    assert set(np.unique(out).tolist()) == {0, 1, 4, 5}
    assert (out[label[0] == 4] == 5).all() and (out[label[0] == 3] == 4).all()  # tumour kept (six_label values)
    filled = (radius < 3) & (label[0] == 0)
    assert filled.any() and (out[filled] == 1).all()  # hole filled as head
    assert (out[~head] == 0).all() and (out[head & (label[0] == 0)] == 1).all()
    closed = AddHeadLabeld("label", src_scheme="brats2024")(
        {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
    )["label"][0].numpy()
    np.testing.assert_array_equal(closed, out)  # default closing changes nothing on a convex head
