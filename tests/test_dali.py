"""The DALI training loader (``"loader": "dali"``): same batches as the MONAI loader, same augmentation
distribution, same order after a resume, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.dali import dali_available
from common.io import DataError

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (requirements-dev.txt)")

GG = ["inference.json", "train.json", "demo.json"]


@pytest.fixture(scope="module")
def gliomagen_data(tmp_path_factory):
    """The GliomaGen bundle's own training chain over 5 small phantom cases."""
    root = tmp_path_factory.mktemp("dali")
    return {"cache_dir": str(root / "cache"), "phantom_cases": 6, "phantom_shape": [40, 40, 24],
            "spatial_size": [16, 16, 16], "num_workers": 0, "batch_size": 2}


def _loaders(overrides: dict, bundle="brats_mri_gliomagen", files=GG):
    """(MONAI loader, DALI loader) parsed from the bundle's configs with the same overrides."""
    from common.bundle import bundle_config

    monai_loader = bundle_config(bundle, files, **overrides).get_parsed_content("train#loader")
    dali_loader = bundle_config(bundle, files, **overrides, loader="dali").get_parsed_content("train#loader")
    return monai_loader, dali_loader


def _epoch(loader, epoch: int, skip: int = 0) -> list[dict]:
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip(skip)
    return [{k: v.clone() for k, v in batch.items() if k in ("image", "label")} for batch in loader]


def test_without_augmentations_dali_gives_the_monai_batches(gliomagen_data):
    from common.engines import DaliLoader

    monai_loader, dali_loader = _loaders({**gliomagen_data, "augmentations": []})
    assert isinstance(dali_loader, DaliLoader) and len(dali_loader) == len(monai_loader) == 2  # 4 training cases
    for epoch in (0, 1):
        ours, theirs = _epoch(dali_loader, epoch), _epoch(monai_loader, epoch)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a["image"].shape == (2, 4, 16, 16, 16) and a["label"].shape == (2, 1, 16, 16, 16)
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)  # tolerance: exact
            torch.testing.assert_close(a["label"], b["label"].float(), rtol=0, atol=0)
    assert not torch.equal(_epoch(dali_loader, 0)[0]["image"], _epoch(dali_loader, 1)[0]["image"])  # reshuffled


def test_flips_follow_the_configured_probability_and_keep_image_and_label_together(gliomagen_data):
    _, plain = _loaders({**gliomagen_data, "augmentations": []})
    _, flipped = _loaders(gliomagen_data)  # the bundle's RandFlipd(prob 0.5, axis 0) on image and label
    reference = {}
    for batch in _epoch(plain, 0):
        for image, label in zip(batch["image"], batch["label"]):
            reference[float(image.sum())] = (image, label)
    n_flipped = n = 0
    for epoch in range(12):
        flipped.sampler.set_epoch(epoch)
        plain.sampler.set_epoch(epoch)
        for got, base in zip(flipped, plain):
            for image, label, image0, label0 in zip(got["image"], got["label"], base["image"], base["label"]):
                n += 1
                if torch.equal(image, image0):
                    assert torch.equal(label, label0)
                else:
                    torch.testing.assert_close(image, image0.flip(1), rtol=0, atol=0)
                    torch.testing.assert_close(label, label0.flip(1), rtol=0, atol=0)
                    n_flipped += 1
    assert n == 48 and 14 <= n_flipped <= 34, n_flipped  # Binomial(48, 0.5): 99.8 % inside


def test_resumed_epoch_continues_with_the_same_batches(gliomagen_data):
    _, loader = _loaders(gliomagen_data)
    full = _epoch(loader, 3)
    resumed = _epoch(loader, 3, skip=2)  # one batch of 2 already consumed before the kill
    assert len(resumed) == len(full) - 1
    for a, b in zip(resumed, full[1:]):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


@pytest.mark.parametrize("factor,fit,grid", [(1.0, True, (16, 16, 16)), (1.15, True, (16, 16, 16)),
                                              (0.9, False, (12, 12, 8)), (1.0, False, (24, 28, 16))])
def test_scale_and_zero_pad_equals_monai_for_the_same_factor(factor, fit, grid):
    """Same zoom (trilinear / nearest) and the same pad-or-crop window as RandScaleZeroPadd, odd sizes included."""
    from common.data.dali import DaliAugmenter, ScaleZeroPad, augmentation_plan, draw
    from common.data.transforms import RandScaleZeroPadd

    rng = np.random.default_rng(0)
    image = np.zeros((2, 19, 24, 13), np.float32)
    image[:, 4:16, 5:19, 2:10] = rng.random((2, 12, 14, 8))
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in image.shape[1:]), indexing="ij")
    label = (((zz - 9) ** 2 + (yy - 11) ** 2 + (xx - 6) ** 2 <= 25) * 3.0).astype(np.float32)[None]  # a ball
    monai_t = RandScaleZeroPadd(["image", "label"], spatial_size=grid, scale_range=(factor, factor), fit=fit)
    plan = augmentation_plan([monai_t])
    assert isinstance(plan[0], ScaleZeroPad)
    params = [draw(plan, 0, {"image": image.shape, "label": label.shape})]
    out = DaliAugmenter(["image", "label"], plan, batch_size=1)([{"image": image, "label": label}], params)
    expected = monai_t({"image": image, "label": label})
    for key in ("image", "label"):
        assert tuple(out[key].shape[1:]) == tuple(expected[key].shape)
    np.testing.assert_allclose(out["image"][0].numpy(), np.asarray(expected["image"]), atol=1e-5)
    # labels: DALI's nearest neighbour samples voxel centres like torch "nearest-exact" (rounding apart);
    # MONAI's Zoom "nearest" (RandScaleZeroPadd's default) takes the floor of the scaled index instead, which
    # moves labels by up to half a voxel against the trilinear image: the two paths differ at label borders
    ours, theirs = out["label"][0, 0].numpy(), np.asarray(expected["label"])[0]
    assert set(np.unique(ours)) == set(np.unique(theirs)) == {0.0, 3.0}
    centred = np.asarray(RandScaleZeroPadd(["label"], spatial_size=grid, scale_range=(factor, factor), fit=fit,
                                           mode=("nearest-exact",))({"label": label})["label"])[0]
    assert (ours != centred).sum() <= 0.1 * (centred > 0).sum()  # measured: 0-6 %


def test_random_scale_factors_follow_the_configured_range():
    from common.data.dali import augmentation_plan, draw
    from common.data.transforms import RandScaleZeroPadd

    plan = augmentation_plan([RandScaleZeroPadd(["image"], (64, 64, 64), (0.8, 1.2), fit=False,
                                                mode=("trilinear",))])
    sizes = np.array([draw(plan, seed, {"image": (1, 100, 100, 100)})[0]["size"] for seed in range(400)])
    assert (sizes[:, 0] == sizes[:, 1]).all()  # isotropic
    assert 80 <= sizes.min() and sizes.max() <= 120 and 95 <= sizes.mean() <= 105  # uniform on [0.8, 1.2]


def test_augmentation_without_dali_equivalent_is_refused_by_name(gliomagen_data):
    from common.bundle import bundle_config

    overrides = {**gliomagen_data, "loader": "dali",
                 "augmentations": [{"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.5}]}
    with pytest.raises(Exception) as err:
        bundle_config("brats_mri_gliomagen", GG, **overrides).get_parsed_content("train#loader")
    from common.errors import user_error

    found = user_error(err.value)
    assert isinstance(found, DataError) and "RandGaussianNoised has no DALI equivalent" in str(found)
    assert "--loader monai" in str(found)


def test_unknown_loader_and_unreadable_cache_are_clear_errors(gliomagen_data, tmp_path):
    from common.bundle import bundle_config
    from common.errors import user_error

    with pytest.raises(Exception) as err:
        bundle_config("brats_mri_gliomagen", GG, **gliomagen_data, loader="fast").get_parsed_content("train#loader")
    assert "choose one of monai, dali" in str(user_error(err.value))
    _, loader = _loaders({**gliomagen_data, "augmentations": []})
    broken = loader.cache.path(0, "image")
    broken.write_bytes(b"not an array")
    try:
        with pytest.raises(DataError) as bad:
            _epoch(loader, 0)
        assert str(broken) in str(bad.value) and "delete" in str(bad.value)
    finally:
        broken.unlink()  # the module's other tests rebuild it


def test_a_case_that_cannot_be_read_names_its_file(gliomagen_data, tmp_path):
    import json

    from common.bundle import bundle_config, resolve_datalist
    from common.errors import user_error

    original = resolve_datalist(None, None, gliomagen_data["cache_dir"], n=6, shape=[40, 40, 24], seed=0,
                                layout="brats2024")
    datalist = json.loads(original.read_text())
    case = datalist["training"][0]
    bad_file = tmp_path / "broken-t2f.nii.gz"
    bad_file.write_bytes(b"\x1f\x8b not a nifti")
    case = {**case, "t2f": str(bad_file)} if "t2f" in case else case
    datalist["training"] = [case]
    broken_list = original.with_name("datalist-broken.json")  # beside it: the case paths are relative
    broken_list.write_text(json.dumps(datalist))
    with pytest.raises(Exception) as err:
        bundle_config("brats_mri_gliomagen", GG, **{**gliomagen_data, "cache_dir": str(tmp_path / "c")}, loader="dali",
                      datalist=str(broken_list)).get_parsed_content("train#loader")
    assert str(bad_file) in str(user_error(err.value) or err.value)


def _train_losses(bundle: str, config_files: str, tmp_path, name: str, extra: list[str]) -> list[float]:
    import os
    import re
    from pathlib import Path

    from helpers import bundle_command

    root = Path(__file__).resolve().parents[1] / "bundles" / bundle
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = bundle_command(root, env, ["run", "training", "--config_file", config_files,
                                      "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                                      "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / name),
                                      "--ckpt_dir", str(tmp_path / f"{name}-models"), *extra])
    return [float(v) for v in re.findall(r"train_loss: ([0-9.]+)", proc.stdout + proc.stderr)]


@pytest.mark.slow
@pytest.mark.parametrize("bundle,files,extra", [
    ("brats_mri_gliomagen", "['configs/inference.json','configs/train.json','configs/demo.json']",
     ["--spatial_size", "[16,16,16]", "--phantom_shape", "[24,24,16]", "--phantom_cases", "4", "--unet_channel_mult",
      "[1,2]", "--unet_attention_levels", "[false,true]", "--batch_size", "2", "--max_epochs", "6",
      "--val_interval", "100", "--lr", "3e-3"]),
    ("brats_mri_cgan_imputation", "['configs/inference.json','configs/train.json','configs/demo.json']",
     ["--phantom_shape", "[48,48,32]", "--phantom_cases", "4", "--spatial_size", "[48,48]", "--batch_size", "2",
      "--val_batch", "32", "--max_iterations", "12", "--val_interval", "100"]),
    ("brats_mri_ldm3d", "['configs/inference.json','configs/train_autoencoder.json','configs/demo.json']",
     ["--spatial_size", "[32,32,16]", "--phantom_shape", "[48,48,30]", "--phantom_cases", "4", "--batch_size", "2",
      "--ae_max_epochs", "5", "--ae_lr", "2e-3", "--val_interval", "100"]),
])
def test_bundles_train_with_the_dali_loader_as_with_monai(tmp_path, bundle, files, extra):
    """Augmentations off: the DALI loader gives the MONAI batches, so training (deterministic on a CPU) follows
    the same loss curve; augmentations on (the bundle's own): the loss falls too. LDM-3D's grid fitting is its
    scale-and-pad augmentation, kept at factor 1 (images identical; labels, which its loss does not read, may
    differ at borders)."""
    if bundle == "brats_mri_cgan_imputation":  # slices are drawn by each loader's own generator: no shared curve
        losses = _train_losses(bundle, files, tmp_path, "dali", [*extra, "--loader", "dali"])
        assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
        return
    fixed = "[]"
    if bundle == "brats_mri_ldm3d":
        fixed = ("[{'_target_': 'common.data.transforms.RandScaleZeroPadd', 'keys': ['image', 'label'], "
                 "'spatial_size': '@spatial_size', 'scale_range': [1.0, 1.0], 'fit': True}]")
    monai_losses = _train_losses(bundle, files, tmp_path, "monai", [*extra, "--augmentations", fixed])
    dali_losses = _train_losses(bundle, files, tmp_path, "dali", [*extra, "--augmentations", fixed, "--loader", "dali"])
    assert len(dali_losses) == len(monai_losses) >= 10  # 2 iterations an epoch
    np.testing.assert_allclose(dali_losses, monai_losses, rtol=1e-3, atol=1e-4)  # the log prints 4 decimals
    augmented = _train_losses(bundle, files, tmp_path, "dali-aug", [*extra, "--loader", "dali"])
    assert np.mean(augmented[-3:]) < np.mean(augmented[:3]), augmented


def test_vqgan_roi_batches_are_the_monai_ones(tmp_path):
    """The VQGAN stage-1 chain (tumour ROIs, no random transform): DALI serves exactly the MONAI batches."""
    overrides = {"roi_size": [16, 16, 16], "phantom_shape": [48, 48, 32], "phantom_cases": 8,
                 "cache_dir": str(tmp_path / "cache"), "num_workers": 0}
    monai_loader, dali_loader = _loaders(overrides, "brats_mri_vqgan_transformer",
                                         ["inference.json", "train_vqgan.json", "demo.json"])
    ours, theirs = _epoch(dali_loader, 1), _epoch(monai_loader, 1)
    assert len(ours) == len(theirs) >= 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["image"], b["image"].float(), rtol=0, atol=0)


def test_imputation_slices_are_cut_padded_and_flipped_as_monai_does(tmp_path):
    """The cGAN chain: 2-D slices drawn among those with enough brain, padded to the grid and flipped in DALI;
    every served slice is the MONAI-padded plane of its cached volume (flipped or not), image keys together."""
    from monai.transforms import ResizeWithPadOrCrop

    overrides = {"phantom_shape": [40, 40, 24], "phantom_cases": 4, "spatial_size": [48, 48],
                 "cache_dir": str(tmp_path / "cache"), "num_workers": 0}
    monai_loader, dali_loader = _loaders(overrides, "brats_mri_cgan_imputation",
                                         ["inference.json", "train.json", "demo.json"])
    assert len(dali_loader) == len(monai_loader)
    step, pad = dali_loader.slicer, ResizeWithPadOrCrop((48, 48))
    flipped = n = 0
    for epoch in range(4):
        dali_loader.sampler.set_epoch(epoch)
        order = [i for i, _ in dali_loader.sampler]
        for b, batch in enumerate(dali_loader):
            assert batch["source"].shape[1:] == (1, 48, 48) and batch["slice"].dtype == torch.int64
            items = [i for i in order[b * dali_loader.batch_size:(b + 1) * dali_loader.batch_size]
                     for _ in range(step.num_samples)]
            for k, (index, z) in enumerate(zip(items, batch["slice"].tolist())):
                assert z in dali_loader._eligible[index]  # enough brain in the slice
                planes = {key: pad(torch.from_numpy(dali_loader.cache.load(index, key)[..., z])) for key in
                          ("source", "target", "mask")}
                is_flipped = not torch.equal(batch["source"][k], planes["source"])
                for key, plane in planes.items():
                    torch.testing.assert_close(batch[key][k], plane.flip(1) if is_flipped else plane, rtol=0, atol=0)
                flipped += is_flipped
                n += 1
    assert n == 4 * 3 * step.num_samples and 0.2 * n <= flipped <= 0.8 * n  # RandFlipd(prob 0.5)


def test_loader_benchmark_suite_times_monai_and_dali_side_by_side(tmp_path, one_torch_thread):
    from common.benchmarks.data import loader
    from common.benchmarks.runner import BenchmarkContext

    # one worker: no DataLoader processes, which must not be forked from this process once DALI's threads run
    # (earlier tests here built pipelines; the suite itself runs every forking variant before its first pipeline)
    ctx = BenchmarkContext("demo", "cpu", repeats=1, warmup=1, workers=1, progress=False, workdir=tmp_path,
                           overrides={"phantom_cases": 4, "phantom_shape": [40, 40, 24], "spatial_size": [16, 16, 16]})
    rows = loader(ctx)["results"]
    assert [(r["group"], r["variant"]) for r in rows] == [
        (name, variant) for name in ("GliomaGen", "LDM-3D autoencoder") for variant in ("MONAI, 0 workers", "DALI (cpu)")]
    for r in rows:
        assert "failed" not in r, r
        assert r["samples_per_epoch"] == 3 and r["samples_per_second"] > 0


def test_two_processes_get_disjoint_shards_that_cover_the_epoch(tmp_path):
    """Under torchrun each rank's DaliLoader serves its own share of the epoch, as the MONAI sampler does."""
    from types import SimpleNamespace

    from monai.data import Dataset
    from monai.transforms import Compose, EnsureTyped, RandFlipd

    from common.engines import DaliLoader, ResumableSampler

    items = [{"image": np.full((1, 4, 4, 4), float(i), np.float32)} for i in range(7)]
    dataset = Dataset(items, transform=Compose([RandFlipd(["image"], prob=0.5, spatial_axis=0),
                                                EnsureTyped(keys=["image"])]))
    seen = {}
    for rank in (0, 1):
        monai_like = SimpleNamespace(dataset=dataset, batch_size=2,
                                     sampler=ResumableSampler(dataset, seed=4, num_replicas=2, rank=rank))
        loader = DaliLoader(monai_like, cache_dir=str(tmp_path))
        loader.sampler.set_epoch(2)
        seen[rank] = [int(v) for batch in loader for v in batch["image"].flatten(1)[:, 0].tolist()]
        reference = ResumableSampler(dataset, seed=4, num_replicas=2, rank=rank, with_epoch=True)
        reference.set_epoch(2)
        assert seen[rank] == [i for i, _ in reference]  # the MONAI sampler's order for this rank
    assert len(seen[0]) == len(seen[1]) == 4  # 7 cases padded to 8, as DistributedSampler does
    assert set(seen[0]) | set(seen[1]) == set(range(7))
