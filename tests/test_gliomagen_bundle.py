"""GliomaGen bundle: paper-size network, configs written once, the 6-label chain, mask checks at inference,
training through ``monai.bundle run`` (1 and 2 processes) and the committed demo weights honouring their mask."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.io import DataError
from helpers import assert_tracked, bundle_command, mlflow_runs, tracking_args

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brats_mri_gliomagen"
PY = sys.executable
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
CONTRASTS = ("t1n", "t1c", "t2w", "t2f")
HEAD, NETC, SNFH, ET, RC = 1, 2, 3, 4, 5


def _bundle_cmd(args, timeout=900, runner=None):
    proc = bundle_command(BUNDLE, ENV, args, timeout, runner)
    return proc.stdout + proc.stderr


def _parser(*files, **overrides):
    from common.bundle import bundle_config

    return bundle_config("brats_mri_gliomagen", list(files), **overrides)


def test_paper_size_network_maps_10_channels_to_the_4_contrasts():
    parser = _parser("inference.json", use_flash_attention=False)
    with torch.device("meta"):
        net = parser.get_parsed_content("network_def")
        assert net.unet.conv_in.conv.in_channels == 10  # 4 noisy contrasts + one-hot 6-label mask
        assert net.unet.block_out_channels == (64, 64, 128, 192, 256)
        out = net(torch.empty(1, 4, 192, 192, 144), torch.zeros(1, dtype=torch.long),
                  condition=torch.empty(1, 1, 192, 192, 144))
    assert tuple(out.shape) == (1, 4, 192, 192, 144)


def test_configs_have_model_zoo_ids_med_ddpm_defaults_and_are_written_once():
    infer, train = _parser("inference.json"), _parser("inference.json", "train.json")
    for key in ("bundle_root", "device", "network_def", "inferer", "output_dir", "dataset_dir", "dataset", "evaluator"):
        assert key in infer, key
    for key in ("bundle_root", "device", "dataset_dir", "train#trainer", "train#trainer#max_epochs", "train#dataset",
                "train#dataset#data", "train#handlers", "validate#evaluator", "validate#handlers",
                "validate#dataset#data", "val_interval"):
        assert key in train, key
    assert train["spatial_size"] == [192, 192, 144] and train["unet_channel_mult"] == [1, 1, 2, 3, 4]
    assert train["num_train_timesteps"] == 1000 and train["beta_schedule"] == "cosine"
    assert train["lr"] == 1e-5 and train["ema_decay"] == 0.995 and train["train#trainer#loss"] == "l1"
    assert infer["sampler"] == "ddpm" and infer["num_inference_steps"] == 1000  # as the paper samples
    text = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert not {"network_def", "unet_def", "prepare_transforms"} & set(text)
    # one prediction_type id drives the training target, the sampler and the weights card
    assert train["prediction_type"] == "epsilon"  # Med-DDPM: the noise
    v = _parser("inference.json", "train.json", prediction_type="v_prediction", sampler="ddim")
    assert v.get_parsed_content("noise_scheduler").prediction_type == "v_prediction"
    assert v.get_parsed_content("scheduler").prediction_type == "v_prediction"
    assert v.get_parsed_content("network_card")["prediction_type"] == "v_prediction"


def test_the_chain_gives_six_label_masks_in_the_head_and_images_in_0_1(phantom_root, tmp_path):
    from common.bundle import prepare_cases
    from common.data.datalist import build_datalist
    from common.gliomagen.masks import input_problems

    datalist = build_datalist(phantom_root, tmp_path / "datalist.json", folds=2, seed=0, progress=False)
    assert datalist["label_scheme"] == "brats2023"  # converted through brats2024 to the 6 labels
    items = prepare_cases(tmp_path / "datalist.json", tmp_path / "prepared", "brats_mri_gliomagen",
                          ["inference.json", "demo.json"], section="validation", progress=False,
                          spatial_size=[48, 48, 32])
    for item in items:
        labels = np.asarray(nib.load(item["label"]).dataobj)
        assert labels.shape == (48, 48, 32) and set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5}
        assert input_problems(labels) == []  # a head, a tumor inside it
        for contrast in CONTRASTS:
            image = np.asarray(nib.load(item[contrast]).dataobj)
            assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.9
            assert np.all(image[labels == 0] == 0)  # background is background


# ------------------------------------------------------------------ inference input checks
SHAPE = (16, 16, 16)


def _tiny_network():
    parser = _parser("inference.json", "demo.json", unet_channel_mult=[1, 2], unet_attention_levels=[False, False])
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").eval()


def _mask():
    m = np.zeros(SHAPE, np.uint8)
    m[2:14, 2:14, 2:14] = HEAD
    m[6:10, 6:10, 6:10] = SNFH
    m[7:9, 7:9, 7:9] = ET
    return m


def _write(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


@pytest.mark.parametrize(
    "case,problem",
    [("labels", "not in scheme"), ("no_head", "no head label"), ("outside", "tumor outside the head"),
     ("2d", "3D label volume"), ("unreadable", "unreadable")],
)
def test_bad_mask_is_refused_by_name_and_nothing_is_written(tmp_path, case, problem):
    from common.generation import MaskSource, NiftiWriter, generate
    from common.gliomagen.masks import input_problems
    from common.samplers import DiffusionSampler, make_scheduler

    (tmp_path / "masks").mkdir()
    _write(tmp_path / "masks" / "A-seg.nii.gz", _mask())
    bad = tmp_path / "masks" / "B-seg.nii.gz"
    if case == "labels":
        _write(bad, _mask() * 2)  # 8 and 10 are not labels of the 6-label scheme
    elif case == "no_head":
        m = _mask()
        m[m == HEAD] = 0
        _write(bad, m)
    elif case == "outside":
        m = np.zeros(SHAPE, np.uint8)
        m[0:2, 0:2, 0:2] = HEAD
        m[8:12, 8:12, 8:12] = SNFH
        _write(bad, m)
    elif case == "2d":
        _write(bad, _mask()[:, :, 0])
    else:
        bad.write_bytes(b"not a NIfTI")
    source = MaskSource(tmp_path / "masks", SHAPE, "six_label", "six_label", validate=input_problems)
    sampler = DiffusionSampler(make_scheduler("ddim", 10, "cosine"), num_inference_steps=2, progress=False)
    with pytest.raises(DataError, match=problem) as err:
        generate(_tiny_network(), sampler, source, NiftiWriter(tmp_path / "out"), progress=False)
    assert "B-seg.nii.gz" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_good_mask_generates_on_its_grid(tmp_path):
    from common.generation import MaskSource, NiftiWriter, generate
    from common.samplers import DiffusionSampler, make_scheduler

    mask = _write(tmp_path / "C-seg.nii.gz", _mask())
    sampler = DiffusionSampler(make_scheduler("ddim", 10, "cosine"), num_inference_steps=2, num_samples=2,
                               progress=False)
    records = generate(_tiny_network(), sampler, MaskSource(mask, SHAPE, "six_label", "six_label"),
                       NiftiWriter(tmp_path / "out"), progress=False)
    assert [r["case"] for r in records] == ["C-s0", "C-s1"]
    img = nib.load(str(tmp_path / "out" / "C-s0" / "C-s0-t2f.nii.gz"))
    assert img.shape == SHAPE and np.allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))


# ------------------------------------------------------------------ end-to-end through monai.bundle run
def _losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"train_loss: ([0-9.]+)", log)]


TINY = ["--spatial_size", "[16,16,16]", "--phantom_shape", "[24,24,16]", "--phantom_cases", "4",
        "--unet_channel_mult", "[1,2]", "--unet_attention_levels", "[false,true]", "--batch_size", "2"]


@pytest.mark.slow
def test_training_through_monai_bundle_run_on_one_and_two_processes(tmp_path):
    common = ["--config_file", "['configs/inference.json','configs/train.json','configs/demo.json']",
              "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
              "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
              "--ckpt_dir", str(tmp_path / "models"), *TINY]
    # the paper's epsilon target: its L1 falls within 60 tiny iterations; the demo's v target takes longer (its
    # learning is what test_demo_model_honours_its_mask shows on the committed weights)
    log = _bundle_cmd(["run", "training", *common, "--max_epochs", "30", "--val_interval", "30", "--lr", "3e-3",
                       "--prediction_type", "epsilon", *tracking_args(tmp_path / "runs")])
    losses = _losses(log)
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses
    (run,) = mlflow_runs(tmp_path / "runs")
    assert_tracked(run, losses, "val_denoising_mse")
    assert "val_denoising_mse" in log
    ema = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # the EMA weights, exported
    assert any(k.startswith("unet.") for k in ema) and any(k.startswith("conditioner.") for k in ema)
    # two processes (gloo): 3 training cases, 2 per process, batch 2 -> 1 iteration per epoch, logged by rank 0
    multi = ["--config_file",
             "['configs/inference.json','configs/train.json','configs/demo.json','configs/multi_gpu_train.json']",
             *common[2:], "--max_epochs", "2", "--val_interval", "2", "--output_dir", str(tmp_path / "runs2"),
             "--ckpt_dir", str(tmp_path / "models2")]
    log = _bundle_cmd(["--nproc_per_node=2", "-m", "monai.bundle", "run", "training", *multi],
                      runner=[PY, "-m", "torch.distributed.run", "--standalone"])
    assert len(_losses(log)) == 2, log[-2000:]
    state = torch.load(tmp_path / "models2" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


# ------------------------------------------------------------------ the committed demo weights
def _compartment_means(volume: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    return {lab: float(volume[labels == lab].mean()) for lab in range(6) if np.any(labels == lab)}


@pytest.mark.slow
def test_demo_model_honours_its_mask(tmp_path):
    """On held-out phantom masks: each compartment shows the real phantoms' intensity signature (ET brighter than
    NETC on t1c, SNFH bright on t2f, RC bright on t2w), checked on the real phantoms of the same masks first, and
    background stays background; with the tumor moved elsewhere in the head the old place loses the signature."""
    from common.bundle import run_bundle
    from common.gliomagen.demo import gliomagen_demo

    gliomagen_demo(tmp_path, n_masks=3, n_augment=1, num_samples=2, cache_dir=tmp_path / "cache", progress=False)
    moved = tmp_path / "moved"
    moved.mkdir()
    seg_files = sorted((tmp_path / "reference").glob("*/*-seg.nii.gz"))
    for seg in seg_files:
        img = nib.load(str(seg))
        labels = np.asarray(img.dataobj)
        tumor = labels >= NETC
        shift = 8 if np.argwhere(tumor)[:, 0].mean() < labels.shape[0] / 2 else -8  # the other hemisphere
        out = np.where(tumor, HEAD, labels)
        rolled = np.roll(np.where(tumor, labels, 0), shift, axis=0)
        out = np.where((rolled > 0) & (out == HEAD), rolled, out)
        nib.save(nib.Nifti1Image(out.astype(np.uint8), img.affine, img.header), str(moved / seg.name))
    run_bundle("brats_mri_gliomagen", ["inference.json", "demo.json"], input=str(moved),
               output_dir=str(tmp_path / "gen_moved"), num_samples=2)
    real, gen, gen_moved = ({c: [] for c in CONTRASTS} for _ in range(3))
    for seg in seg_files:
        case = seg.name[: -len("-seg.nii.gz")]
        labels = np.asarray(nib.load(str(seg)).dataobj)
        for c in CONTRASTS:
            real[c].append(_compartment_means(nib.load(str(seg.parent / f"{case}-{c}.nii.gz")).get_fdata(), labels))
        for s in (0, 1):
            for c in CONTRASTS:
                name = f"{case}-s{s}/{case}-s{s}-{c}.nii.gz"
                gen[c].append(_compartment_means(nib.load(str(tmp_path / "generated" / name)).get_fdata(), labels))
                gen_moved[c].append(_compartment_means(nib.load(str(tmp_path / "gen_moved" / name)).get_fdata(),
                                                       labels))

    def mean(values, lab):
        return float(np.mean([v[lab] for v in values if lab in v]))

    # the phantoms' signatures, in [0, 1] units: each holds on the real phantoms of these masks first
    for images in (real, gen):
        assert mean(images["t1c"], ET) > mean(images["t1c"], NETC) + 0.15  # enhancement
        assert mean(images["t2f"], SNFH) > mean(images["t2f"], HEAD) + 0.1  # oedema bright on FLAIR
        assert mean(images["t2w"], RC) > mean(images["t2w"], HEAD) + 0.3  # the fluid-filled cavity bright on T2
    assert mean(real["t2f"], 0) == 0.0
    assert mean(gen["t2f"], 0) < 0.05 and mean(gen["t1c"], 0) < 0.05  # background stays background
    # the signature follows the mask: at the old place, with the tumor moved, it is clearly weaker
    assert mean(gen_moved["t1c"], ET) < mean(gen["t1c"], ET) - 0.1
    assert mean(gen_moved["t2f"], SNFH) < mean(gen["t2f"], SNFH) - 0.05
    # augmented masks generated too, and the demo picture material is there
    assert list((tmp_path / "generated_augmented").glob("*/*-t2f.nii.gz"))
    assert list((tmp_path / "augmented" / "previews").glob("*.png"))
    # the bundle's model drives dataset synthesis: one BraTS-2024 case per augmented mask, BraTS labels in -seg
    proc = subprocess.run([PY, "-m", "tools", "synthesize", "--masks", str(tmp_path / "augmented"), "--out",
                           str(tmp_path / "synthetic"), "--label_scheme", "six_label",
                           "--generator", "common.gliomagen.generator:demo_generator", "--progress", "False"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "synthetic" / "manifest.json").read_text())
    cases = sorted(p.name for p in (tmp_path / "synthetic").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(cases) == 3 and len(manifest["cases"]) == 3
    seg = np.asarray(nib.load(str(next((tmp_path / "synthetic" / cases[0]).glob("*-seg.nii.gz")))).dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 3, 4} and len(np.unique(seg)) > 2  # BraTS 2024: the head dropped


def test_benchmark_suites_time_training_variants_and_samplers_side_by_side():
    from common.benchmarks import run_benchmark

    tiny = {"spatial_size": [16, 16, 16], "unet_channel_mult": [1, 2], "unet_attention_levels": [False, True],
            "batch_size": 1}
    # 3 repeats: the per-step time is a difference of two medians, which one noisy call can turn negative
    report = run_benchmark("gliomagen_train,gliomagen_sample", size="demo", device="cpu", repeats=3, warmup=0,
                           samplers="ddim:4,rflow:4", max_steps=0, overrides=tiny, progress=False)
    train = {r["variant"]: r for r in report["suites"]["gliomagen_train"]["results"]}
    assert train["fp32"]["seconds"]["median"] > 0 and train["fp16 autocast + GradScaler"]["skipped"] == "needs CUDA"
    for name in ("bf16 autocast", "bf16 autocast + checkpointing"):
        assert "seconds" in train[name] or train[name]["failed"].startswith("non-finite loss")
    sample = {r["variant"]: r for r in report["suites"]["gliomagen_sample"]["results"]}
    assert set(sample) == {"DDIM-4", "RFlow-4"} and all(r["per_step_s"] > 0 for r in sample.values())
    assert "4x16x16x16" in report["suites"]["gliomagen_sample"]["notes"][0]
    with pytest.raises(ValueError, match="unknown override"):
        run_benchmark("gliomagen_train", size="demo", device="cpu", overrides={"unet_width": 3}, progress=False)
