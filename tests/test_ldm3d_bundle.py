"""LDM-3D bundle: metadata, config ids, mask validation, outputs on the mask's grid, training through
``monai.bundle run`` (1 and 2 processes) and the committed demo weights honouring their condition.

Commands run exactly as docs/README.md says: from the bundle root, with the project installed (``make setup``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.io import DataError
from helpers import assert_tracked, bundle_command, mlflow_runs, tensorboard_images, tracking_args

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_mri_ldm3d"
PY = sys.executable
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}


def _bundle_cmd(args, timeout=600, runner=None):
    proc = bundle_command(BUNDLE, ENV, args, timeout, runner)
    return proc.stdout + proc.stderr


def test_configs_have_model_zoo_ids_and_paper_defaults():
    from monai.bundle import ConfigParser

    cfg = BUNDLE / "configs"
    infer = ConfigParser()
    infer.read_config(str(cfg / "inference.json"))
    for key in ("bundle_root", "device", "network_def", "inferer", "output_dir"):
        assert key in infer, key
    for stage in (["inference.json", "train_autoencoder.json"],
                  ["inference.json", "train_autoencoder.json", "train_diffusion.json"]):
        train = ConfigParser()
        train.read_config([str(cfg / f) for f in stage])
        for key in ("bundle_root", "device", "dataset_dir", "train#trainer", "train#trainer#max_epochs",
                    "train#dataset", "train#dataset#data", "train#handlers", "validate#evaluator",
                    "validate#handlers", "validate#dataset#data", "val_interval"):
            assert key in train, (stage, key)
        assert train["spatial_size"] == [128, 128, 64] and train["latent_channels"] == 8
    assert train["unet_base_channels"] == 256 and train["num_train_timesteps"] == 1000
    big = ConfigParser()
    big.read_config([str(cfg / f) for f in ("inference.json", "train_autoencoder.json", "train_diffusion.json",
                                              "unet_352.json")])
    assert big["unet_base_channels"] == 352
    # written once: the training configs do not restate the networks or the deterministic chain
    for name in ("train_autoencoder.json", "train_diffusion.json"):
        text = json.loads((cfg / name).read_text())
        assert not {"autoencoder_def", "network_def", "prepare_transforms", "unet_base_channels"} & set(text), name


def test_training_and_validation_chains_share_the_deterministic_steps():
    from common.bundle import bundle_config

    parser = bundle_config("brats_mri_ldm3d", ["inference.json", "train_autoencoder.json", "demo.json"],
                           label_scheme="brats2023")
    prepare = parser.get_parsed_content("prepare_transforms")
    train = parser.get_parsed_content("train#preprocessing").transforms
    val = parser.get_parsed_content("validate#preprocessing").transforms
    infer = parser.get_parsed_content("preprocessing").transforms
    assert len(prepare) == 4
    for chain in (train, val, infer):
        assert [type(t) for t in chain[:4]] == [type(t) for t in prepare]
    assert type(val[4]).__name__ == type(infer[4]).__name__ == "RandScaleZeroPadd" and val[4].prob == 0.0
    assert train[4].prob > 0 and type(train[5]).__name__ == "RandFlipd"


def test_rank_gated_handlers_are_disabled_off_the_main_process(tmp_path):
    from common.bundle import bundle_config

    files = ["inference.json", "train_autoencoder.json", "demo.json"]
    names = lambda handlers: [type(h).__name__ for h in handlers]  # noqa: E731
    main = bundle_config("brats_mri_ldm3d", files, output_dir=str(tmp_path))  # TensorBoard writers: not in the bundle
    other = bundle_config("brats_mri_ldm3d", files, log_on_this_rank=False, output_dir=str(tmp_path))
    for key in ("train#handlers", "validate#handlers"):
        assert len(names(other.get_parsed_content(key, instantiate=True))) < len(
            names(main.get_parsed_content(key, instantiate=True)))
    kept = names(other.get_parsed_content("train#handlers"))
    assert kept == ["ValidationHandler", "FullStateCheckpointer"]  # every rank validates and checkpoints


# ------------------------------------------------------------------ inference input checks and outputs
SHAPE = (16, 16, 8)


def _tiny_network():
    from common.ldm3d import build_ldm
    from common.networks import build_autoencoder

    torch.manual_seed(0)
    ae = build_autoencoder(channels=(4, 8, 8), latent_channels=3, num_res_blocks=1, norm_num_groups=4)
    ldm = build_ldm(ae, latent_channels=3, base_channels=8, channel_mult=(1, 1), attention_levels=(False, True),
                    num_res_blocks=1, num_head_channels=8, cross_attention_dim=8, norm_num_groups=4,
                    conditioner_channels=(4, 4), condition_channels=2, token_grid=(2, 2, 1))
    ldm.scale_factor.fill_(1.0)
    return ldm.eval()


def _sampler(num_samples=1):
    from common.samplers import DiffusionSampler, make_scheduler

    return DiffusionSampler(make_scheduler("ddim", num_train_timesteps=10), num_inference_steps=2,
                            num_samples=num_samples, seed=3, progress=False)


def _generate(masks, out):
    from common.generation import MaskSource, NiftiWriter, generate

    return generate(_tiny_network(), _sampler(num_samples=2), MaskSource(masks, SHAPE), NiftiWriter(out),
                    progress=False)


def _write_mask(path, data, affine=None, zooms=(1.5, 1.5, 2.5)):
    data = np.asarray(data)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]) if affine is None else affine)
    img.header.set_zooms(tuple(zooms) + (1.0,) * (data.ndim - 3))
    nib.save(img, str(path))
    return path


def _good_mask():
    m = np.zeros(SHAPE, np.uint8)
    m[5:10, 6:11, 2:6] = 2
    m[6:8, 7:9, 3:5] = 3
    return m


def test_generate_writes_brats_named_contrasts_on_the_mask_grid(tmp_path):
    affine = np.array([[-1.5, 0, 0, 10], [0, 1.5, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    mask_path = _write_mask(tmp_path / "BraTS-GLI-00042-000-seg.nii.gz", _good_mask(), affine)
    records = _generate(mask_path, tmp_path / "out")
    assert [r["case"] for r in records] == ["BraTS-GLI-00042-000-s3", "BraTS-GLI-00042-000-s4"]
    folder = tmp_path / "out" / "BraTS-GLI-00042-000-s3"
    for contrast in ("t1n", "t1c", "t2w", "t2f"):
        img = nib.load(str(folder / f"BraTS-GLI-00042-000-s3-{contrast}.nii.gz"))
        assert img.shape == SHAPE
        assert np.allclose(img.affine, affine) and np.allclose(img.header.get_zooms(), (1.5, 1.5, 2.5))
        assert np.isfinite(img.get_fdata()).all()
    png = folder / "BraTS-GLI-00042-000-s3.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seg = nib.load(str(folder / "BraTS-GLI-00042-000-s3-seg.nii.gz"))
    assert np.array_equal(np.asarray(seg.dataobj), _good_mask())
    assert json.loads((tmp_path / "out" / "generation.json").read_text())["samples"][1]["seed"] == 4


@pytest.mark.parametrize(
    "case,problem",
    [
        ("shape", "does not match the model's grid"),
        ("empty", "mask is empty"),
        ("labels", "not in scheme"),
        ("unreadable", "unreadable"),
        ("fractional", "non-integer"),
        ("4d", "3D label volume"),
        ("duplicate", "same case id"),
    ],
)
def test_bad_mask_is_refused_by_name_and_nothing_is_written(tmp_path, case, problem):
    (tmp_path / "masks").mkdir()
    good = _write_mask(tmp_path / "masks" / "A-seg.nii.gz", _good_mask())
    bad = tmp_path / "masks" / "B-seg.nii.gz"
    if case == "shape":
        _write_mask(bad, np.pad(_good_mask(), ((0, 2), (0, 0), (0, 0))))
    elif case == "empty":
        _write_mask(bad, np.zeros(SHAPE, np.uint8))
    elif case == "labels":
        _write_mask(bad, _good_mask() * 3)  # values 6 and 9
    elif case == "unreadable":
        bad.write_bytes(b"this is not a NIfTI file")
    elif case == "fractional":
        _write_mask(bad, _good_mask().astype(np.float32) * 0.5)
    elif case == "duplicate":  # another file naming case A: outputs would overwrite each other
        bad = _write_mask(tmp_path / "masks" / "A-seg.nii", _good_mask())
    else:
        _write_mask(bad, np.stack([_good_mask()] * 2, -1))
    with pytest.raises(DataError, match=problem) as err:
        _generate(tmp_path / "masks", tmp_path / "out")
    assert bad.name in str(err.value)
    assert good.exists() and not (tmp_path / "out").exists()  # the good mask was not generated either


def test_mask_input_forms(tmp_path):
    from common.generation import collect_masks

    case = tmp_path / "case1"
    case.mkdir()
    for name in ("case1-t1n.nii.gz", "case1-t2f.nii.gz"):
        _write_mask(case / name, np.zeros(SHAPE, np.float32))
    _write_mask(case / "case1-seg.nii.gz", _good_mask())
    assert [c for c, _ in collect_masks(tmp_path)] == ["case1"]  # images beside the mask are not masks
    with pytest.raises(DataError, match="does not exist"):
        collect_masks(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("?")
    with pytest.raises(DataError, match="not a NIfTI"):
        collect_masks(tmp_path / "x.txt")


# ------------------------------------------------------------------ end-to-end through monai.bundle run
def _losses(log: str, tag: str = "train_loss") -> list[float]:
    return [float(v) for v in re.findall(rf"{tag}: ([0-9.]+)", log)]


TINY = ["--spatial_size", "[32,32,16]", "--phantom_shape", "[48,48,30]", "--phantom_cases", "4",
        "--batch_size", "2", "--diffusion_batch_size", "3", "--val_interval", "100"]


@pytest.mark.slow
def test_both_stages_train_through_monai_bundle_run_and_infer(tmp_path):
    cfg = "configs/{}"
    common = ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
              "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
              "--ckpt_dir", str(tmp_path / "models"), *tracking_args(tmp_path / "runs"), *TINY]
    log = _bundle_cmd(["run", "training", "--config_file",
                       f"['{cfg.format('inference.json')}','{cfg.format('train_autoencoder.json')}','{cfg.format('demo.json')}']",
                       "--ae_max_epochs", "6", "--ae_lr", "2e-3", *common, "--val_interval", "6"])
    for metric in ("val_mae", "val_psnr", "val_ssim"):  # the paper's Table 1 metrics, on the validation cases
        assert re.search(rf"{metric}: [0-9.]+", log), metric
    losses = _losses(log)
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert_tracked(mlflow_runs(tmp_path / "runs")[0], losses, "val_psnr")  # --tracking mlflow
    # TensorBoard: real above reconstructed, middle axial slice of the 4 contrasts, at the validation epoch
    assert tensorboard_images(tmp_path / "runs")["validation/real_vs_generated"] == [(6, 64, 128)]
    assert (tmp_path / "models" / "autoencoder.pt").exists()
    assert list((tmp_path / "cache").glob("phantoms_*/datalist.json"))  # phantom data made on first use
    log = _bundle_cmd(["run", "training", "--config_file",
                       f"['{cfg.format('inference.json')}','{cfg.format('train_autoencoder.json')}',"
                       f"'{cfg.format('train_diffusion.json')}','{cfg.format('demo.json')}']", "--diffusion_max_epochs", "12", "--val_interval", "12",
                       *common[:-2]])
    losses = _losses(log)
    assert len(losses) == 12 and np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    runs = mlflow_runs(tmp_path / "runs")
    assert len(runs) == 2  # one run per stage
    assert_tracked(runs[1], losses, "val_denoising_mse")
    assert len(tensorboard_images(tmp_path / "runs")["validation/real_vs_generated"]) == 1  # none of noise
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert float(state["scale_factor"]) > 0  # computed once, stored in the diffusion checkpoint
    assert "val_denoising_mse" in log

    from common.bundle import prepare_cases

    datalist = next((tmp_path / "cache").glob("phantoms_*/datalist.json"))
    prepare_cases(datalist, tmp_path / "ref", "brats_mri_ldm3d", ["inference.json", "demo.json"], section="validation",
                  progress=False, spatial_size=[32, 32, 16])
    _bundle_cmd(["run", "--config_file", "['configs/inference.json','configs/demo.json']",
                 "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                 "--ckpt_dir", str(tmp_path / "models"), "--spatial_size", "[32,32,16]",
                 "--input", str(tmp_path / "ref"), "--output_dir", str(tmp_path / "gen"), "--num_inference_steps", "3"])
    gen = json.loads((tmp_path / "gen" / "generation.json").read_text())["samples"]
    assert len(gen) == 1 and all(Path(p).exists() for p in gen[0]["files"].values())


@pytest.mark.slow
def test_multi_gpu_overlay_trains_with_two_cpu_processes(tmp_path):
    log = _bundle_cmd(
        ["--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file",
         "['configs/inference.json','configs/train_autoencoder.json','configs/demo.json','configs/multi_gpu_train.json']",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
         "--ckpt_dir", str(tmp_path / "models"), *TINY, "--ae_max_epochs", "2"],
        runner=[PY, "-m", "torch.distributed.run", "--standalone"],
    )
    # 3 training cases split over 2 processes (padded to 2 each) -> 1 iteration of batch 2 per epoch, logged by
    # rank 0 only (a single process would log 2 iterations per epoch)
    assert len(_losses(log)) == 2, log[-2000:]
    assert (tmp_path / "models" / "autoencoder.pt").exists()
    assert (tmp_path / "runs" / "autoencoder" / "latest.pt").exists()
    log = _bundle_cmd(
        ["--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file",
         "['configs/inference.json','configs/train_autoencoder.json','configs/train_diffusion.json','configs/demo.json',"
         "'configs/multi_gpu_train.json','configs/multi_gpu_train_diffusion.json']",
         "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
         "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
         "--ckpt_dir", str(tmp_path / "models"), *TINY, "--diffusion_max_epochs", "2"],
        runner=[PY, "-m", "torch.distributed.run", "--standalone"],
    )
    assert len(_losses(log)) == 2, log[-2000:]  # 3 cases, 2 per process, batch 3 -> 1 iteration per epoch
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert float(state["scale_factor"]) > 0 and not any(k.startswith("module.") for k in state)


# ------------------------------------------------------------------ the committed demo weights
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_weights_match_large_files_yml():
    import yaml

    listed = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    entries = [(e["path"], e["hash_val"]) for e in listed if e["hash_type"] == "sha256"]
    assert {p for p, _ in entries} == {"models/autoencoder.pt", "models/model.pt",  # + their weights cards
                                       "models/autoencoder.json", "models/model.json"}
    for rel, digest in entries:
        path = BUNDLE / rel
        assert path.stat().st_size < 25 * 2**20
        assert _sha256(path) == digest, rel


def _contrast(volume: np.ndarray, region: np.ndarray, brain: np.ndarray) -> float:
    return float(volume[region & brain].mean() - volume[~region & brain].mean())


@pytest.mark.slow
def test_demo_model_honours_its_mask(tmp_path):
    """On held-out phantom masks, generated FLAIR/T2 are brighter inside the mask than in the rest of the brain,
    and clearly less so at that place when the mask is moved elsewhere (same seeds; demo.json's guidance 3)."""
    from common.ldm3d.demo import ldm3d_demo

    ldm3d_demo(tmp_path, n_masks=2, num_samples=2, num_inference_steps=25, cache_dir=tmp_path / "cache",
               progress=False)
    moved = tmp_path / "moved"
    moved.mkdir()
    for seg in sorted((tmp_path / "reference").glob("*/*-seg.nii.gz")):
        img = nib.load(str(seg))
        labels = np.asarray(img.dataobj)
        shift = 22 if np.argwhere(labels > 0)[:, 0].mean() < labels.shape[0] / 2 else -22  # other hemisphere
        _write_mask(moved / seg.name, np.roll(labels, shift, axis=0), img.affine, img.header.get_zooms()[:3])
    from common.bundle.run import run_bundle

    run_bundle("brats_mri_ldm3d", ["inference.json", "demo.json"], input=str(moved), output_dir=str(tmp_path / "gen_moved"),
               num_samples=2, num_inference_steps=25)
    for contrast in ("t2f", "t2w"):
        here, there = [], []
        for seg in sorted((tmp_path / "reference").glob("*/*-seg.nii.gz")):
            case = seg.name[: -len("-seg.nii.gz")]
            region = np.asarray(nib.load(str(seg)).dataobj) > 0
            brain = np.asarray(nib.load(str(seg.parent / f"{case}-t1n.nii.gz")).dataobj) != 0
            for s in (0, 1):
                name = f"{case}-s{s}/{case}-s{s}-{contrast}.nii.gz"
                here.append(_contrast(nib.load(str(tmp_path / "generated" / name)).get_fdata(), region, brain))
                there.append(_contrast(nib.load(str(tmp_path / "gen_moved" / name)).get_fdata(), region, brain))
        # z-score units (the phantoms' own tumors are 1-2.3 SD brighter; the demo autoencoder keeps about half)
        assert np.mean(here) > 0.5, (contrast, here)
        assert np.mean(here) > np.mean(there) + 0.3, (contrast, here, there)
    # evaluate.json: generated vs the held-out cases they were generated from (paired by source_id)
    run_bundle("brats_mri_ldm3d", ["evaluate.json"], real=str(tmp_path / "reference" / "datalist.json"),
               synthetic=str(tmp_path / "generated" / "datalist.json"), output_dir=str(tmp_path / "eval"),
               extractor="none", n_bootstrap=10)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["info"]["n_paired"] == 4 and metrics["contrasts"]["t2f"]["paired"]["n_pairs"] == 4
