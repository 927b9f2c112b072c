"""Feature extractors (through the real slice/volume/weight-loading code with small networks), memorisation."""

import numpy as np
import pytest
import torch
from torch import nn

from common.io import DataError
from common.metrics import features as Fx
from common.metrics.memorisation import nearest_neighbours


class TinyNet2d(nn.Module):
    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class TinyNet3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 6, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def _brain(shape=(16, 16, 10), filled=(slice(3, 13), slice(3, 13), slice(2, 8))):
    v = np.zeros(shape, np.float32)
    v[filled] = np.random.default_rng(0).random(v[filled].shape) + 0.5
    return v


@pytest.mark.parametrize("name, file", [
    ("inception2d", "inception_v3_google-0cc3c7bd.pth"),
    ("radimagenet2.5d", "RadImageNet-ResNet50.pt"),
    ("medicalnet3d", "resnet_50_23dataset.pth"),
])
def test_missing_published_weights_say_which_file_goes_where(tmp_path, monkeypatch, name, file):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        Fx.build_extractor(name, device="cpu")
    message = str(err.value)
    assert file in message and str(tmp_path / "hub" / "checkpoints" / file) in message and "--weights" in message


def test_weights_are_found_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    target = tmp_path / "checkpoints" / "inception_v3_google-0cc3c7bd.pth"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert Fx.find_weights("inception2d") == target
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"y")
    assert Fx.find_weights("inception2d", explicit) == explicit


def test_state_dict_loading_strips_prefixes_and_rejects_misfits(tmp_path):
    source = TinyNet3d()
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    target = Fx.load_state_dict_file(TinyNet3d(), path, rename=Fx._strip_prefixes)
    assert torch.equal(target.conv.weight, source.conv.weight)
    with pytest.raises(DataError, match="do not fit"):
        Fx.load_state_dict_file(TinyNet2d(), path, rename=Fx._strip_prefixes)


def test_radimagenet_sequential_keys_map_to_torchvision_names():
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    backbone = nn.Sequential(*list(net.children())[:-1])
    mapped = {Fx._radimagenet_key("backbone." + k) for k in backbone.state_dict()}
    assert mapped == {k for k in net.state_dict() if not k.startswith("fc.")}


def test_slice_extractor_gives_one_row_per_non_empty_slice():
    vol = _brain()
    axial = Fx.SliceFeatureExtractor(TinyNet2d(), ("axial",), input_size=32, device="cpu")
    feats = axial(vol)
    assert feats.shape == (6, 8) and feats.dtype == torch.float32  # slices 2..7 hold brain
    three = Fx.SliceFeatureExtractor(TinyNet2d(), ("axial", "coronal", "sagittal"), input_size=32, device="cpu", stride=2)
    assert three(vol).shape[0] == 3 + 5 + 5
    assert torch.allclose(axial(vol * 7.0), feats, atol=1e-5)  # intensity scale does not change features


def test_volume_extractor_and_torchscript_plugin(tmp_path):
    vol = _brain()
    ext = Fx.VolumeFeatureExtractor(TinyNet3d(), device="cpu")
    assert ext(vol).shape == (1, 6)
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(TinyNet3d()), str(path))
    plugged = Fx.build_extractor(str(path), mode="3d", device="cpu")
    assert plugged(vol).shape == (1, 6)
    rows = Fx.extract_features(plugged, [lambda: vol, vol], progress=False)
    assert torch.allclose(rows[0], rows[1])
    with pytest.raises(ValueError, match="unknown feature extractor"):
        Fx.build_extractor("vgg")


def test_memorisation_flags_copies_and_spares_new_samples():
    rng = np.random.default_rng(1)
    train = [rng.random((16, 16, 8)).astype(np.float32) + 0.1 for _ in range(5)]
    copy = train[2] + 0.01 * rng.standard_normal(train[2].shape).astype(np.float32)
    new = rng.random((16, 16, 8)).astype(np.float32) + 0.1
    res = nearest_neighbours([copy, new], train, ["copy", "new"], [f"t{i}" for i in range(5)], grid=(8, 8, 4))
    by_id = {s["id"]: s for s in res["samples"]}
    assert by_id["copy"]["near_copy"] and by_id["copy"]["nearest_training_id"] == "t2"
    assert not by_id["new"]["near_copy"]
    assert res["n_flagged"] == 1 and res["threshold"] > by_id["copy"]["distance"]
