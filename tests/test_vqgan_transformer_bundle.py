"""VQGAN + masked transformer bundle: paper-size networks, configs written once on inference.json, the ROI chain's
errors, inference outputs and bad requests, both stages through ``monai.bundle run`` (1 and 2 processes), and the
committed demo weights: codebook usage and class conditioning.

Commands run as docs/README.md says: from the bundle root, with the project installed (``make setup``).
"""

from __future__ import annotations

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
BUNDLE = REPO / "bundles" / "brats_mri_vqgan_transformer"
NAME = BUNDLE.name
PY = sys.executable
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
DEMO = ["inference.json", "demo.json"]
USAGE_FLOOR = 0.25  # fraction of the demo codebook's 64 codes the real phantom ROIs must use (docs/README.md)


def _bundle_cmd(args, timeout=900, runner=None, check=True):
    return bundle_command(BUNDLE, ENV, args, timeout, runner, check)


def _parser(*files, **overrides):
    """The bundle's configs; handlers made from it write TensorBoard files to a temporary folder, not the bundle."""
    import tempfile

    from common.bundle import bundle_config

    return bundle_config(NAME, list(files), **{"output_dir": tempfile.mkdtemp(prefix="vqgan-test-"), **overrides})


# ------------------------------------------------------------------ networks and configs
@pytest.mark.slow  # paper-size construction (300 M parameters on the meta device): about a minute on 2 busy cores
def test_paper_size_networks_map_128_cubed_to_8_cubed_tokens_and_back():
    parser = _parser("inference.json")
    with torch.device("meta"):
        vqgan = parser.get_parsed_content("vqgan_def")
        out = vqgan(torch.empty(1, 1, 128, 128, 128))
        transformer = parser.get_parsed_content("network_def")
        logits = transformer(torch.zeros(1, 8, 8, 8, dtype=torch.long), torch.ones(1, dtype=torch.long))
    assert tuple(out["pred"].shape) == (1, 1, 128, 128, 128)
    assert tuple(out["indices"].shape) == (1, 8, 8, 8) and tuple(out["importance"].shape) == (1, 1, 8, 8, 8)
    assert tuple(out["class_logits"].shape) == (1, 2)
    assert vqgan.num_embeddings == 1024 and vqgan.vqvae.embedding_dim == 128
    assert tuple(logits.shape) == (1, 512, 1024)  # logits over the codebook for every token
    assert len(transformer.blocks) == 24 and transformer.head.in_features == 1024


def test_configs_have_model_zoo_ids_paper_defaults_and_are_written_once():
    infer = _parser("inference.json")
    for key in ("bundle_root", "device", "network_def", "vqgan_def", "inferer", "output_dir", "dataset_dir",
                "dataset", "evaluator", "preprocessing"):
        assert key in infer, key
    stage1 = _parser("inference.json", "train_vqgan.json")
    stage2 = _parser("inference.json", "train_vqgan.json", "train_transformer.json")
    for train in (stage1, stage2):
        for key in ("bundle_root", "device", "dataset_dir", "train#trainer", "train#trainer#max_epochs",
                    "train#dataset", "train#dataset#data" if train is stage1 else "train#dataset", "train#handlers",
                    "validate#evaluator", "validate#handlers", "validate#dataset", "val_interval"):
            assert key in train, key
    assert stage1["roi_size"] == [128, 128, 128] and stage1["num_embeddings"] == 1024
    assert stage1["train#trainer#adversarial_criterion"] == "hinge" and stage1["train#trainer#adaptive_weight"]
    assert stage1["reconstruction_weight"] == 0.8 and stage1["classification_weight"] == 0.2
    assert stage1["feature_matching_weight"] > 0
    assert stage2["topk_ratio"] == 0.25 and stage2["transformer_layers"] == 24
    for overlay, ratio in (("topk_0.json", 0.0), ("topk_50.json", 0.5)):
        parsed = _parser("inference.json", "train_vqgan.json", "train_transformer.json", overlay)
        assert parsed.get_parsed_content("masking").topk_ratio == ratio
    for name in ("train_vqgan.json", "train_transformer.json", "evaluate.json", "multi_gpu_train.json"):
        text = json.loads((BUNDLE / "configs" / name).read_text())
        assert not {"vqgan_def", "network_def", "prepare_transforms", "preprocessing"} & set(text), name


def test_stage1_objective_has_the_papers_terms():
    parser = _parser("inference.json", "train_vqgan.json", "demo.json")
    losses = parser.get_parsed_content("vqgan_losses")
    assert set(losses) == {"l1", "perceptual", "quantization", "classification"}
    assert not losses["perceptual"].active  # no local weights: off, as documented
    assert losses["l1"].weight == pytest.approx(0.8) and losses["classification"].weight == pytest.approx(0.2)
    handlers = parser.get_parsed_content("train#handlers")
    assert any(type(h).__name__ == "CodebookHealth" for h in handlers)


def test_rank_gated_handlers_are_disabled_off_the_main_process():
    files = ["inference.json", "train_vqgan.json", "demo.json"]
    names = lambda handlers: [type(h).__name__ for h in handlers]  # noqa: E731
    main = names(_parser(*files).get_parsed_content("train#handlers"))
    other = names(_parser(*files, log_on_this_rank=False).get_parsed_content("train#handlers"))
    assert other == ["ValidationHandler", "CodebookHealth", "FullStateCheckpointer"]  # every rank runs these
    assert sorted(set(main) - set(other)) == ["CheckpointSaver", "StatsHandler", "TensorBoardStatsHandler", "WeightsCard"]


# ------------------------------------------------------------------ the ROI chain and its errors
def test_the_chain_gives_tumour_rois_in_minus_one_one_with_the_grade_as_class(phantom_root, tmp_path):
    from common.data.datalist import build_datalist
    from common.vqgan_transformer.bundle import real_rois

    build_datalist(phantom_root, tmp_path / "datalist.json", folds=2, seed=0, progress=False)
    chain = _parser(*DEMO).get_parsed_content("preprocessing")
    rois, labels = real_rois(tmp_path / "datalist.json", chain, progress=False)
    assert len(rois) == 6 and set(labels) == {0, 1}
    for roi in rois:
        assert roi.shape == (1, 32, 32, 32) and roi.min() == -1.0 and roi.max() == pytest.approx(1.0)
        assert 0.0 < (roi > -1).mean() < 1.0  # tumour inside, background outside


def test_a_case_without_grade_or_without_tumour_is_refused_by_name(phantom_root, tmp_path):
    from common.data.datalist import build_datalist, load_datalist

    build_datalist(phantom_root, tmp_path / "datalist.json", folds=2, seed=0, progress=False)
    item = dict(load_datalist(tmp_path / "datalist.json", "training")[0])
    chain = _parser(*DEMO).get_parsed_content("preprocessing")

    def user_error(data) -> str:  # MONAI's Compose wraps it; the excepthook prints the DataError in the chain
        from common.errors import user_error

        with pytest.raises(Exception) as err:
            chain(data)
        found = user_error(err.value)
        assert isinstance(found, DataError), err.value
        return str(found)

    message = user_error({**item, "grade": None})
    assert item["id"] in message and "has no grade" in message
    seg = nib.load(item["label"])
    empty = tmp_path / "empty-seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), str(empty))
    assert "no tumour voxels" in user_error({**item, "label": str(empty)})


# ------------------------------------------------------------------ inference with the committed demo weights
def test_bad_requests_are_data_errors():
    from common.vqgan_transformer.bundle import ClassRequest, TokenSampler

    with pytest.raises(DataError, match="unknown class 'GBM'"):
        ClassRequest("GBM", 2)
    with pytest.raises(DataError, match="count must be a positive integer"):
        ClassRequest("HGG", 0)
    with pytest.raises(DataError, match="3 seeds given for 4 samples"):
        ClassRequest("both", 2, seeds=[1, 2, 3])
    with pytest.raises(DataError, match="unknown decoding method"):
        TokenSampler(method="beam")
    request = ClassRequest("both", 2, seed=10)
    assert [r["class"] for r in request] == ["LGG", "LGG", "HGG", "HGG"] and request.seeds == [10, 11, 12, 13]


def test_inference_writes_rois_montage_and_manifest(tmp_path, one_torch_thread):
    from common.bundle import run_bundle

    out = tmp_path / "gen"
    run_bundle(NAME, DEMO, **{"class": "both", "count": 2, "seed": 5, "output_dir": str(out)})
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["class"] for s in manifest["samples"]] == ["LGG", "LGG", "HGG", "HGG"]
    assert [s["seed"] for s in manifest["samples"]] == [5, 6, 7, 8]
    assert manifest["method"] == "maskgit" and manifest["network_passes"] == 12
    spacing = _parser(*DEMO)["roi_spacing"]
    for s in manifest["samples"]:
        img = nib.load(str(out / s["file"]))
        data = img.get_fdata()
        assert img.shape == (32, 32, 32) and data.min() >= -1.0 and data.max() <= 1.0
        assert np.allclose(np.diag(img.affine)[:3], spacing)
        assert np.allclose(img.affine[:3, 3], -0.5 * 31 * np.asarray(spacing))  # centred at the origin
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # same seed, same ROI, whatever else is drawn with it
    run_bundle(NAME, DEMO, **{"class": "HGG", "count": 1, "seed": 7, "output_dir": str(tmp_path / "one")})
    again = nib.load(str(tmp_path / "one" / "roi_0000_HGG.nii.gz")).get_fdata()
    assert np.allclose(again, nib.load(str(out / "roi_0002_HGG.nii.gz")).get_fdata(), atol=1e-5)


@pytest.mark.parametrize("flag,value,message", [("--class", "GBM", "unknown class 'GBM'"),
                                                 ("--count", "0", "count must be a positive integer")])
def test_bad_request_through_monai_bundle_run_is_one_line_and_writes_nothing(tmp_path, flag, value, message):
    out = tmp_path / "gen"
    proc = _bundle_cmd(["run", "--config_file", "['configs/inference.json','configs/demo.json']",
                        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
                        "--output_dir", str(out), flag, value], timeout=300, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: {flag}: {message}" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()


# ------------------------------------------------------------------ end-to-end through monai.bundle run
def _values(log: str, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{key}: ([0-9.]+)", log)]


TINY = ["--roi_size", "[16,16,16]", "--phantom_shape", "[48,48,32]", "--phantom_cases", "8",
        "--vqgan_channels", "[8,16]", "--num_embeddings", "16", "--embedding_dim", "8",
        "--importance_head_channels", "8", "--transformer_hidden_size", "32", "--transformer_layers", "1",
        "--transformer_heads", "2", "--batch_size", "3", "--transformer_batch_size", "3"]


@pytest.mark.slow
def test_both_stages_train_through_monai_bundle_run_and_their_losses_fall(tmp_path):
    args = ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "runs"),
            "--ckpt_dir", str(tmp_path / "models"), *tracking_args(tmp_path / "runs"), *TINY]
    stage1 = "['configs/inference.json','configs/train_vqgan.json','configs/demo.json']"
    # the adversarial term (which does not fall) is exercised by the two-process run below
    log = _bundle_cmd(["run", "training", "--config_file", stage1, *args, "--vqgan_max_epochs", "30",
                       "--val_interval", "30", "--adversarial_warmup", "1000", "--codebook_interval", "10",
                       "--dead_code_after", "10", "--vqgan_lr", "3e-3"]).stdout
    losses = _values(log, "train_loss")
    assert len(losses) == 60 and np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses
    assert_tracked(mlflow_runs(tmp_path / "runs")[0], losses, "val_mae")
    assert tensorboard_images(tmp_path / "runs")["validation/real_vs_generated"] == [(30, 32, 16)]  # FLAIR ROI
    usage = _values(log, "codebook_usage")
    assert usage and "codebook_perplexity" in log and "val_mae" in log
    state = torch.load(tmp_path / "models" / "vqgan.pt", weights_only=True)
    assert any(k.startswith("importance_head.") for k in state) and "code_age" in state

    stage2 = "['configs/inference.json','configs/train_vqgan.json','configs/train_transformer.json','configs/demo.json']"
    # no dropout: 6 tiny ROIs and 80 iterations are too few to learn through the demo's 0.1
    log = _bundle_cmd(["run", "training", "--config_file", stage2, *args, "--transformer_max_epochs", "40",
                       "--val_interval", "20", "--transformer_lr", "3e-3", "--transformer_dropout", "0.0"]).stdout
    losses = _values(log, "train_loss")
    assert len(losses) == 80 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
    assert_tracked(mlflow_runs(tmp_path / "runs")[1], losses, "val_masked_token_ce")
    val = _values(log, "-- val_masked_token_ce")
    assert len(val) == 2 and min(val) < np.log(16), val  # better than a uniform guess over the 16 codes
    assert (tmp_path / "models" / "model.pt").is_file()

    # two processes (gloo), stage 1: 6 training cases, 3 per process, batch 3 -> 1 iteration per epoch
    multi = "['configs/inference.json','configs/train_vqgan.json','configs/demo.json','configs/multi_gpu_train.json']"
    log = _bundle_cmd(["--nproc_per_node=2", "-m", "monai.bundle", "run", "training", "--config_file", multi,
                       *args, "--vqgan_max_epochs", "2", "--val_interval", "2", "--adversarial_warmup", "1",
                       "--output_dir", str(tmp_path / "runs2"), "--ckpt_dir", str(tmp_path / "models2")],
                      runner=[PY, "-m", "torch.distributed.run", "--standalone"]).stdout
    assert len(_values(log, "train_loss")) == 2, log[-2000:]
    state = torch.load(tmp_path / "models2" / "vqgan.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


# ------------------------------------------------------------------ the committed demo weights
@pytest.fixture(scope="module")
def demo_rois(tmp_path_factory):
    """Real ROIs of 16 held-out phantom cases (seed 1000; the demo weights saw seed 0) through the bundle's chain."""
    from common.bundle import phantom_datalist
    from common.vqgan_transformer.bundle import real_rois

    parser = _parser(*DEMO)
    datalist = phantom_datalist(tmp_path_factory.mktemp("heldout"), n=16, shape=parser["phantom_shape"], seed=1000,
                                folds=1, progress=False)
    return real_rois(datalist, parser.get_parsed_content("preprocessing"), progress=False)


@pytest.mark.slow
def test_demo_vqgan_uses_its_codebook(demo_rois, one_torch_thread):
    from common.vqgan_transformer.codebook import codebook_stats

    rois, _ = demo_rois
    vqgan = _parser(*DEMO).get_parsed_content("vqgan")
    tokens, importance = vqgan.tokens(torch.as_tensor(np.stack(rois)))
    stats = codebook_stats(torch.bincount(tokens.reshape(-1), minlength=vqgan.num_embeddings))
    assert stats["usage"] >= USAGE_FLOOR, stats
    recon = vqgan.decode_tokens(tokens).clamp(-1, 1)
    mae = float((recon - torch.as_tensor(np.stack(rois))).abs().mean())
    assert mae < 0.15, mae  # held-out ROIs come back close (values in [-1, 1])


@pytest.fixture(scope="module")
def demo_generated(tmp_path_factory):
    """12 LGG and 12 HGG ROIs of the committed demo model, through the bundle's inference workflow (seed 0)."""
    from common.bundle import run_bundle
    from common.vqgan_transformer.bundle import load_generated

    out = tmp_path_factory.mktemp("generated") / "gen"
    run_bundle(NAME, DEMO, **{"class": "both", "count": 12, "seed": 0, "output_dir": str(out)})
    return load_generated(out)


@pytest.mark.slow
def test_demo_model_generates_the_requested_class(demo_rois, demo_generated, one_torch_thread):
    """A classifier trained on real phantom ROIs only ranks the generated ROIs by the class they were asked
    for, clearly above chance: AUC, threshold-free (the phantoms' two grades are separable: checked first, on
    the same real ROIs)."""
    from common.vqgan_transformer.evaluation import class_adherence, statistic_separability

    rois, labels = demo_rois
    assert statistic_separability(rois, labels, folds=4)["accuracy"]["mean"] > 0.7
    generated, requested = demo_generated
    assert requested.count(0) == requested.count(1) == 12
    scores = class_adherence(rois, labels, generated, requested)["statistics"]
    assert scores["auc"] >= 0.75, scores


@pytest.mark.slow
def test_demo_random_order_decoding_is_closer_to_the_real_rois(demo_rois, demo_generated, tmp_path, one_torch_thread):
    """Why demo.json sets choice_temperature 1000: revealing tokens in random order gives a lower per-class MMD
    to held-out real ROIs than MaskGIT's confidence-first order (4.5), on both classes, same seeds."""
    from common.bundle import run_bundle
    from common.vqgan_transformer.bundle import load_generated
    from common.vqgan_transformer.evaluation import per_class_quality

    rois, labels = demo_rois
    assert _parser(*DEMO)["choice_temperature"] == 1000
    run_bundle(NAME, DEMO, **{"class": "both", "count": 12, "seed": 0, "output_dir": str(tmp_path / "gen"),
                              "choice_temperature": 4.5})
    by_class = lambda images, classes: {name: [x for x, c in zip(images, classes) if c == i]  # noqa: E731
                                        for i, name in enumerate(("LGG", "HGG"))}
    real = by_class(rois, labels)
    random_order = per_class_quality(real, by_class(*demo_generated))
    confidence_first = per_class_quality(real, by_class(*load_generated(tmp_path / "gen")))
    for cls in ("LGG", "HGG"):
        assert random_order[cls]["n_synthetic"] == confidence_first[cls]["n_synthetic"] == 12
        assert random_order[cls]["mmd"]["value"] < 0.8 * confidence_first[cls]["mmd"]["value"], cls


@pytest.mark.slow
def test_demo_parallel_decoding_is_as_close_to_the_real_rois_as_raster(demo_rois, one_torch_thread):
    """The issue's speed goal on the committed demo model: MaskGIT with >= 30x fewer network passes than raster
    decoding, at equal or better per-class MMD to held-out real ROIs (same seeds, the demo's settings)."""
    from common.vqgan_transformer.evaluation import compare_decoders

    parser = _parser(*DEMO)
    rois, labels = demo_rois
    real = {name: [x for x, c in zip(rois, labels) if c == i] for i, name in enumerate(("LGG", "HGG"))}
    res = compare_decoders(parser.get_parsed_content("vqgan"), parser.get_parsed_content("network"), real, count=8,
                           steps=parser["steps"], guidance_scale=parser["guidance_scale"], seed=0, batch_size=8,
                           choice_temperature=parser["choice_temperature"])
    assert res["passes_ratio"] >= 30 and res["speedup"] >= 10, res
    for cls in ("LGG", "HGG"):
        assert res["maskgit"][f"mmd_{cls}"] <= res["raster"][f"mmd_{cls}"], (cls, res)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap: the demo VQGAN decodes tumours darker and with a dim rim "
                   "(generated mean about -0.3 against the real 0.05-0.23), so at the real data's threshold every "
                   "generated ROI is called HGG (accuracy 0.5) although the ranking follows the class: see "
                   "docs/README.md, Limits")
def test_demo_rois_are_classified_as_real_ones_are(demo_rois, demo_generated, one_torch_thread):
    """Realism on top of class adherence: the real-ROI classifier, at its own threshold, labels the generated
    ROIs with their requested class (accuracy >= 0.7)."""
    from common.vqgan_transformer.evaluation import class_adherence

    rois, labels = demo_rois
    generated, requested = demo_generated
    scores = class_adherence(rois, labels, generated, requested)["statistics"]
    assert scores["accuracy"] >= 0.7, scores


@pytest.mark.slow
def test_make_demo_step_draws_generated_beside_real(tmp_path, one_torch_thread):
    from common.vqgan_transformer.demo import vqgan_demo

    result = vqgan_demo(tmp_path, count=2, n_real=4, cache_dir=tmp_path / "cache", progress=False)
    for key in ("picture", "workflow", "importance"):
        assert result[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert result["classes"] == ["LGG", "LGG", "HGG", "HGG"]
    assert len(list((tmp_path / "generated").glob("roi_*.nii.gz"))) == 4
    assert sum(result["real_counts"].values()) == 4
