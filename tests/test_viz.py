import numpy as np
from PIL import Image

from common.viz import mask_center, middle_slices, save_montage


def test_slices_cut_through_the_mask():
    mask = np.zeros((20, 30, 10), np.uint8)
    mask[3:6, 20:24, 7:9] = 1
    c = mask_center(mask, mask.shape)
    assert c == [4, 22, 8]
    vol = np.zeros(mask.shape, np.float32)
    vol[c[0], c[1], c[2]] = 5.0
    slices = middle_slices(vol, c)
    assert all(s.max() == 5.0 for s in slices.values())


def test_montage_draws_red_outline(tmp_path):
    rng = np.random.default_rng(0)
    images = {k: rng.random((32, 32, 16)).astype(np.float32) for k in ("t1n", "t2f")}
    mask = np.zeros((32, 32, 16), np.uint8)
    mask[10:20, 10:20, 5:11] = 1
    path = save_montage(images, tmp_path / "m.png", mask=mask, title="case")
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    assert red.sum() > 50  # the contour is drawn; a grey-only picture has no such pixels
    plain = save_montage(images, tmp_path / "plain.png")
    rgb2 = np.asarray(Image.open(plain).convert("RGB")).astype(int)
    assert ((rgb2[..., 0] > 180) & (rgb2[..., 1] < 80) & (rgb2[..., 2] < 80)).sum() == 0


def test_anisotropic_voxels_are_drawn_to_scale(tmp_path):
    """A cube of 64x64x32 voxels at 1x1x2 mm is square in every plane once the affine is given."""
    vol = np.zeros((64, 64, 32), np.float32)
    vol[16:48, 16:48, 8:24] = 1.0
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    from common.viz import _matplotlib

    plt = _matplotlib()
    shown = {}
    original = plt.Axes.imshow

    def spy(ax, data, **kw):
        shown.setdefault(kw["aspect"], data.shape)
        return original(ax, data, **kw)

    plt.Axes.imshow = spy
    try:
        save_montage({"x": vol}, tmp_path / "a.png", affine=affine)
    finally:
        plt.Axes.imshow = original
    assert set(shown) == {1.0, 2.0}  # axial square pixels; coronal and sagittal rows are 2 mm tall
