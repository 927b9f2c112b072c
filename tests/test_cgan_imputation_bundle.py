"""cGAN imputation bundle (Genc et al. 2022): paper-size networks, configs layered on inference.json, the slice
chain, imputation through the bundle on the source grid, one-line errors, training through ``monai.bundle run``
(1 and 2 processes), the hyper-parameter search through the bundle, and the committed demo weights against the
input-vs-target baseline on held-out phantom cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.io import DataError
from helpers import (assert_imputed_on_source_grid, assert_tracked, bundle_command, mlflow_runs, tensorboard_images,
                     tracking_args)

REPO = Path(__file__).resolve().parents[1]
NAME = "brats_mri_cgan_imputation"
BUNDLE = REPO / "bundles" / NAME
PY = sys.executable
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
DEMO = ["inference.json", "demo.json"]
HELD_OUT_SEED = 1000  # the demo weights were trained on phantom seed 0


def _parser(*files, **overrides):
    from common.bundle import bundle_config

    return bundle_config(NAME, list(files), **overrides)


def _bundle_cmd(args, timeout=900, runner=None, check=True):
    return bundle_command(BUNDLE, ENV, args, timeout, runner, check)


# ------------------------------------------------------------------------------------------ configs
def test_paper_size_networks_and_paper_defaults():
    parser = _parser("inference.json", "train.json")
    assert parser["n_blocks"] == 9 and parser["base_channels"] == 64 and parser["spatial_size"] == [256, 256]
    assert parser["discriminator_channels"] == 64 and parser["discriminator_layers"] == 3
    assert parser["l1_weight"] == 100.0 and parser["learning_rate"] == 2e-4 and parser["beta1"] == 0.5
    assert parser["max_iterations"] == 5000 and parser["train#trainer#adversarial_criterion"] == "@adversarial_criterion"
    with torch.device("meta"):
        gen = parser.get_parsed_content("network_def")
        disc = parser.get_parsed_content("discriminator_def")
        out = gen(torch.empty(1, 1, 256, 256))
        logits = disc(torch.empty(1, 2, 256, 256))[-1]  # source + image
    assert tuple(out.shape) == (1, 1, 256, 256)
    assert tuple(logits.shape) == (1, 1, 30, 30)  # the 70x70 PatchGAN's map on 256x256
    assert len(gen.model) > 9 and sum(type(m).__name__ == "ResnetBlock" for m in gen.model) == 9


def test_configs_are_layered_once_and_overlays_hold_the_paper_values():
    from common.cgan_imputation.tune import CONFIG_IDS, PAPER_FOUND, SEARCH_SPACE

    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert not {"network_def", "discriminator_def", "prepare_transforms", "preprocessing"} & set(train)
    parser = _parser("inference.json", "train.json")
    for key in ("bundle_root", "device", "network_def", "inferer", "dataset_dir", "dataset", "evaluator", "output_dir",
                "train#trainer", "train#dataset#data", "train#handlers", "validate#evaluator", "val_interval"):
        assert key in parser, key
    for name in SEARCH_SPACE:  # every searched parameter is a config id of the training
        assert CONFIG_IDS[name] in parser, name
    losses = parser["losses"]
    assert losses["l1"]["weight"] == "@l1_weight" and losses["lesion"]["_target_"].endswith("MaskedL1")
    trainer = parser["train#trainer"]
    assert (trainer["input_key"], trainer["target_key"], trainer["condition_key"]) == ("source", "target", "source")
    for task, overlay in (("t2w_t2f", "paper_t2w_to_t2f.json"), ("t1c_t1n", "paper_t1c_to_t1n.json")):
        values = {k: v for k, v in json.loads((BUNDLE / "configs" / overlay).read_text()).items() if k[0] != "_"}
        assert values == PAPER_FOUND[task], overlay
    t1 = _parser("inference.json", "task_t1c_to_t1n.json")
    assert t1.get_parsed_content("sources") == ["t1c"] and t1.get_parsed_content("target") == "t1n"
    assert t1.get_parsed_content("weights_name") == "model_t1c_t1n.pt"
    no_mask = _parser("inference.json", "train.json", "train_no_mask.json")
    assert no_mask.get_parsed_content("mask_weight") == 0.0
    assert no_mask.get_parsed_content("weights_name") == "model_no_mask.pt"


def test_training_chain_gives_batch_samples_slices_with_source_target_and_lesion_mask(phantom_root, tmp_path):
    from common.data.datalist import build_datalist

    build_datalist(phantom_root, tmp_path / "datalist.json", folds=2, seed=0, progress=False)
    parser = _parser("inference.json", "train.json", "demo.json", datalist=str(tmp_path / "datalist.json"),
                     batch_samples=3)
    chain = parser.get_parsed_content("train#preprocessing")
    item = parser.get_parsed_content("train#dataset#data")[0]
    samples = chain(dict(item))
    assert isinstance(samples, list) and len(samples) == 3
    for s in samples:
        assert tuple(s["source"].shape) == (1, 96, 96) and tuple(s["target"].shape) == (1, 96, 96)
        assert s["source"].min() >= 0 and s["source"].max() <= 1 and s["brain"].any()
        assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
        assert not s["mask"][s["brain"] == 0].any()  # the lesion sits in the brain


# ------------------------------------------------------------------------------------------ inference
@pytest.fixture
def missing_flair(without_flair):
    """Two phantom cases with their FLAIR deleted."""
    return without_flair(2)


def _impute(configs=DEMO, **overrides):
    from common.bundle import run_bundle

    return run_bundle(NAME, list(configs), **overrides)


def _user_error(configs=DEMO, **overrides) -> DataError:
    """The DataError a run stops with (monai.bundle wraps it in RuntimeError; the excepthook prints it alone)."""
    from common.errors import user_error

    with pytest.raises(Exception) as info:
        _impute(configs, **overrides)
    err = user_error(info.value)
    assert isinstance(err, DataError), info.value
    return err


def test_bundle_imputes_on_the_source_grid_with_a_sidecar_and_the_dataset_validates(missing_flair, tmp_path,
                                                                                     one_torch_thread):
    from common.data.datalist import build_datalist

    records = _impute(dataset_dir=str(missing_flair), in_place=True, progress=False)[0]
    assert len(records) == 2
    for rec in records:
        assert_imputed_on_source_grid(rec["output"], rec["output"].replace("-t2f.", "-t2w."))
        side = json.loads(Path(rec["sidecar"]).read_text())
        assert side["synthetic"] is True and side["target"] == "t2f" and list(side["sources"]) == ["t2w"]
        assert "model.pt (sha256 " in side["model"]
    build_datalist(missing_flair, tmp_path / "imputed.json", folds=1, progress=False)  # a valid dataset again
    # a second run finds the imputed files: refused by name, nothing replaced
    before = Path(records[0]["output"]).stat().st_mtime_ns
    err = _user_error(dataset_dir=str(missing_flair), in_place=True, progress=False)
    assert "already exists (an earlier imputation)" in str(err) and Path(records[0]["output"]).name in str(err)
    assert Path(records[0]["output"]).stat().st_mtime_ns == before


def test_bundle_never_overwrites_an_acquired_scan_and_writes_copies_elsewhere(phantom_root, tmp_path,
                                                                              one_torch_thread):
    case = sorted(p for p in phantom_root.iterdir() if p.is_dir())[0]
    acquired = case / f"{case.name}-t2f.nii.gz"
    stamp = acquired.stat().st_mtime_ns
    assert "already exists (an acquired scan)" in str(_user_error(dataset_dir=str(case), in_place=True,
                                                                  progress=False))
    assert acquired.stat().st_mtime_ns == stamp
    records = _impute(dataset_dir=str(case), output_dir=str(tmp_path / "out"), progress=False)[0]
    assert Path(records[0]["output"]).is_relative_to(tmp_path / "out")
    assert (tmp_path / "out" / case.name / f"{case.name}-t2w.nii.gz").exists()  # the copy is a whole case


def test_evaluate_config_scores_both_models_against_the_input(phantom_root, tmp_path, one_torch_thread):
    from common.bundle import run_bundle
    from common.data.datalist import build_datalist

    data = tmp_path / "real"
    for case in sorted(p for p in phantom_root.iterdir() if p.is_dir())[:2]:
        shutil.copytree(case, data / case.name)
    build_datalist(data, tmp_path / "real.json", folds=1, progress=False)
    predicted = {}
    for name, weights in (("with mask loss", "model.pt"), ("without mask loss", "model_no_mask.pt")):
        out = tmp_path / weights.replace(".pt", "")
        _impute(dataset_dir=str(data), output_dir=str(out), load_path=str(BUNDLE / "models" / weights),
                progress=False)
        predicted[name] = str(out)
    scatter = run_bundle(NAME, ["inference.json", "evaluate.json"], run_id="evaluate", datalist=str(tmp_path / "real.json"),
                         predicted=predicted, eval_dir=str(tmp_path / "eval"))[0]
    assert Path(scatter).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(report["models"]) == set(predicted) and report["title"] == "t2w -> t2f"
    for model in report["models"].values():
        ssim = model["summary"]["ssim_brain"]
        assert ssim["n_scans"] == 2 and 0 < ssim["predicted"]["mean"] <= 1 and 0 < ssim["input"]["mean"] <= 1
    a, b = (report["models"][n]["per_scan"][0]["predicted"]["mae_brain"] for n in predicted)
    assert a != b  # two different models were scored


@pytest.mark.parametrize("problem", ["source_missing", "source_is_target", "other_task_weights", "no_input"])
def test_bad_inference_input_is_refused_by_name(problem, missing_flair, tmp_path):
    overrides = {"dataset_dir": str(missing_flair), "output_dir": str(tmp_path / "out"), "progress": False}
    configs = DEMO
    if problem == "source_missing":
        victim = next(missing_flair.glob("*/*-t2w.nii.gz"))
        victim.unlink()
        match, named = "source contrast t2w", victim.name
    elif problem == "source_is_target":
        overrides.update(sources=["t2f"], target="t2f", load_path=str(BUNDLE / "models" / "model.pt"))
        match, named = "also a source", "--target"
    elif problem == "other_task_weights":
        overrides.update(load_path=str(BUNDLE / "models" / "model.pt"))
        configs = ["inference.json", "task_t1c_to_t1n.json", "demo.json"]
        match, named = "trained for t2w -> t2f", "model.pt"
    else:
        overrides["dataset_dir"] = ""
        match, named = "no input given", "--dataset_dir"
    err = _user_error(configs, **overrides)
    assert match in str(err) and named in str(err), str(err)
    assert not list((tmp_path / "out").rglob("*-t2f.*"))  # nothing half-written


def test_a_lesion_mask_on_another_grid_stops_training_naming_the_file(phantom_root, tmp_path):
    from common.cgan_imputation.data import apply_chain
    from common.data.datalist import build_datalist

    data = tmp_path / "data"
    shutil.copytree(phantom_root, data)
    build_datalist(data, tmp_path / "datalist.json", folds=2, seed=0, progress=False)
    parser = _parser("inference.json", "train.json", "demo.json", datalist=str(tmp_path / "datalist.json"))
    item = parser.get_parsed_content("train#dataset#data")[0]
    seg = Path(item["label"])
    img = nib.load(str(seg))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine, img.header), str(seg))
    with pytest.raises(DataError, match="differs from") as err:
        apply_chain(parser.get_parsed_content("train#preprocessing"), item)
    assert seg.name in str(err.value)


@pytest.mark.slow  # one interpreter start through monai.bundle run (15-40 s on the shared cores)
def test_a_user_mistake_through_monai_bundle_run_is_one_line(tmp_path):
    proc = _bundle_cmd(["run", "--config_file", "['configs/inference.json','configs/demo.json']",
                        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                        "--dataset_dir", str(tmp_path / "nowhere")], check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: .*nowhere: input does not exist.*", last), last
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ training
def test_learning_rate_follows_pix2pix_constant_then_linear_to_zero():
    parser = _parser("inference.json", "train.json")
    parser["max_iterations"] = 100
    factor = parser.get_parsed_content("lr_factor")
    assert [factor(it) for it in (0, 25, 50, 75, 100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    parser = _parser("inference.json", "train.json")
    parser.update({"max_iterations": 100, "lr_decay_from": 1.0})
    factor = parser.get_parsed_content("lr_factor")
    assert [factor(it) for it in (0, 50, 99)] == [1.0, 1.0, 1.0]  # constant: no decay


TINY = ["--phantom_shape", "[48,48,32]", "--phantom_cases", "4", "--spatial_size", "[48,48]", "--batch_size", "2",
        "--val_batch", "32"]


def _losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"train_loss: ([0-9.]+)", log)]


@pytest.mark.slow
def test_training_through_monai_bundle_run_on_one_and_two_processes(tmp_path):
    from common.cgan_imputation.impute import load_generator

    common = ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
              "--cache_dir", str(tmp_path / "cache"), *TINY]
    files = "['configs/inference.json','configs/train.json','configs/task_t1c_to_t1n.json','configs/demo.json'"
    proc = _bundle_cmd(["run", "training", "--config_file", files + "]", *common, "--max_iterations", "6",
                        "--val_interval", "3", "--output_dir", str(tmp_path / "runs"),
                        "--ckpt_dir", str(tmp_path / "models"), *tracking_args(tmp_path / "runs")])
    log = proc.stdout + proc.stderr
    assert len(_losses(log)) == 6 and "val_ssim" in log  # 3 training cases, batch 2 -> 2 iterations an epoch
    (run,) = mlflow_runs(tmp_path / "runs")
    assert_tracked(run, _losses(log), "val_ssim")
    pictures = tensorboard_images(tmp_path / "runs")["validation/real_vs_generated"]
    assert [step for step, _, _ in pictures] == [3]  # validation every 3 epochs (2 iterations each), 6 iterations
    assert pictures[0][1] == 2 * pictures[0][2]  # T1: real above imputed
    gen, info = load_generator(tmp_path / "models" / "model_t1c_t1n.pt")
    assert info["sources"] == ["t1c"] and info["target"] == "t1n" and info["spatial_size"] == [48, 48]
    assert info["generator_config"]["base_channels"] == 32  # the demo overlay's generator
    # full state for an exact resume, the learning-rate schedules in it: at max_iterations pix2pix's decay is at 0
    state = torch.load(tmp_path / "runs" / "model_t1c_t1n" / "latest.pt", weights_only=True)["objects"]
    for schedule, optimizer in (("lr_generator", "optimizer"), ("lr_discriminator", "d_optimizer")):
        assert state[schedule]["last_epoch"] == 6 and state[schedule]["base_lrs"] == [1e-3]
        assert [group["lr"] for group in state[optimizer]["param_groups"]] == [0.0]
    # two processes (gloo): 2 training cases per process, batch 2 -> 1 iteration an epoch, logged by rank 0
    multi = files + ",'configs/multi_gpu_train.json']"
    proc = _bundle_cmd(["--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file", multi, *common,
                        "--max_iterations", "2", "--val_interval", "2", "--output_dir", str(tmp_path / "runs2"),
                        "--ckpt_dir", str(tmp_path / "models2")],
                       runner=[PY, "-m", "torch.distributed.run", "--standalone"])
    assert len(_losses(proc.stdout + proc.stderr)) == 2, (proc.stdout + proc.stderr)[-2000:]
    state = torch.load(tmp_path / "models2" / "model_t1c_t1n.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["generator"])


@pytest.mark.slow
def test_search_through_the_bundle_resumes_from_its_database_and_its_overlay_trains(tmp_path):
    from common.bundle import run_bundle
    from common.cgan_imputation.impute import load_generator

    tiny = {"phantom_shape": [48, 48, 32], "phantom_cases": 4, "spatial_size": [48, 48], "val_batch": 32,
            "cache_dir": str(tmp_path / "cache"), "max_iterations": 4, "val_interval": 1,
            "output_dir": str(tmp_path / "trials"), "ckpt_dir": str(tmp_path / "trial_models"), "resume": False}
    configs = ["inference.json", "train.json", "demo.json"]
    search = dict(tune_dir=str(tmp_path / "tune"), train_configs=configs, trial_overrides=tiny, plots=False)
    first = run_bundle(NAME, ["tune.json"], run_id="tune", n_trials=2, **search)[0]
    assert sum(first["n_trials"].values()) == 2 and (tmp_path / "tune" / "study.db").exists()
    again = run_bundle(NAME, ["tune.json"], run_id="tune", n_trials=3, **search)[0]
    assert again["resumed_with_finished"] == 2 and sum(again["n_trials"].values()) == 3
    overlay = json.loads((tmp_path / "tune" / "best_overlay.json").read_text())
    assert set(overlay) == {"learning_rate", "batch_size", "batch_samples", "l1_weight", "mask_weight"}
    assert overlay == again["best_params"]
    # the overlay trains: layered after the bundle's configs
    run_bundle(NAME, [*configs, str(tmp_path / "tune" / "best_overlay.json")], run_id="training",
               **{**tiny, "ckpt_dir": str(tmp_path / "best"), "output_dir": str(tmp_path / "best_runs")})
    _, info = load_generator(tmp_path / "best" / "model.pt")
    assert info["iterations"] >= 4


# ------------------------------------------------------------------------------------------ demo weights
@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Four phantom cases of another seed at the demo weights' grid: never seen in training."""
    from common.bundle import phantom_datalist
    from common.data.datalist import load_datalist

    shape = _parser("inference.json", "train.json", "demo.json")["phantom_shape"]
    path = phantom_datalist(tmp_path_factory.mktemp("held_out"), n=4, shape=shape, seed=HELD_OUT_SEED, folds=1,
                            progress=False)
    return load_datalist(path, ("training", "validation"))


def _score(weights: str, sources, target, items):
    from common.cgan_imputation.evaluate import score_generator
    from common.cgan_imputation.impute import load_generator

    gen, info = load_generator(BUNDLE / "models" / weights)
    assert info["sources"] == list(sources) and info["target"] == target
    return score_generator(gen, items, sources, target, batch=32, spatial_size=info["spatial_size"])["summary"]


def _summary_line(task: str, s: dict) -> str:
    b = s["ssim_brain"]
    return (f"\n{task}: SSIM brain predicted {b['predicted']['mean']:.3f} ± {b['predicted']['std']:.3f} vs input "
            f"{b['input']['mean']:.3f} ± {b['input']['std']:.3f} (n={b['n_scans']}); MAE brain "
            f"{s['mae_brain']['predicted']['mean']:.4f} vs {s['mae_brain']['input']['mean']:.4f}; lesion SSIM "
            f"{s['ssim_lesion']['predicted']['mean']:.3f} vs {s['ssim_lesion']['input']['mean']:.3f}, lesion MAE "
            f"{s['mae_lesion']['predicted']['mean']:.4f} vs {s['mae_lesion']['input']['mean']:.4f}")


@pytest.mark.slow  # two demo models over four held-out volumes
def test_demo_t2_flair_model_beats_the_input_and_the_mask_loss_effect_is_measured(held_out, one_torch_thread):
    t2f = _score("model.pt", ["t2w"], "t2f", held_out)
    no_mask = _score("model_no_mask.pt", ["t2w"], "t2f", held_out)
    print(_summary_line("t2w -> t2f", t2f), _summary_line("t2w -> t2f, no mask loss", no_mask))
    for s in (t2f, no_mask):
        assert s["ssim_brain"]["n_scans"] == 4
        assert s["ssim_brain"]["predicted"]["mean"] > s["ssim_brain"]["input"]["mean"]
        assert s["mae_brain"]["predicted"]["mean"] < s["mae_brain"]["input"]["mean"]
    # the lesion-mask loss, whichever way it goes: both models scored in the same lesions
    with_mask, without = t2f["mae_lesion"]["predicted"], no_mask["mae_lesion"]["predicted"]
    assert with_mask["n"] == without["n"] == 4 and with_mask["mean"] != without["mean"]
    print(f"lesion MAE with the mask loss {with_mask['mean']:.4f}, without {without['mean']:.4f}: the mask loss "
          f"{'lowers' if with_mask['mean'] < without['mean'] else 'does not lower'} the error inside the lesion")


@pytest.mark.slow
def test_demo_t1_model_beats_the_input(held_out, one_torch_thread):
    t1n = _score("model_t1c_t1n.pt", ["t1c"], "t1n", held_out)
    print(_summary_line("t1c -> t1n", t1n))
    assert t1n["ssim_brain"]["n_scans"] == 4
    assert t1n["ssim_brain"]["predicted"]["mean"] > t1n["ssim_brain"]["input"]["mean"]


@pytest.mark.slow
def test_cgan_demo_imputes_a_deleted_flair_and_draws_it_beside_the_real_one(tmp_path, one_torch_thread):
    from common.cgan_imputation.demo import cgan_demo

    result = cgan_demo(tmp_path, progress=False)
    case = Path(result["case"])
    assert not (tmp_path / "real").samefile(case) and Path(result["real"]).exists()
    imputed, source = nib.load(result["imputed"]), nib.load(str(case / f"{case.name}-t2w.nii.gz"))
    assert imputed.shape == source.shape and np.allclose(imputed.affine, source.affine)
    assert json.loads(Path(result["sidecar"]).read_text())["synthetic"] is True
    assert Path(result["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["ssim_brain"] > result["ssim_input"]
