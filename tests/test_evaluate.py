"""End to end: tiny NIfTI sets -> ``python -m tools evaluate`` / ``evaluate_sets`` -> metrics.json, report, PNGs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.io import load_nifti, save_json, save_nifti
from common.metrics import EvalConfig, evaluate_sets, load_items

SHAPE = (24, 24, 16)
REPO = Path(__file__).resolve().parents[1]


def _case(rng, tumor_at):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    brain = x**2 + y**2 + (z * 1.2) ** 2 < 0.8
    label = np.zeros(SHAPE, np.uint8)
    tx, ty, tz = tumor_at
    label[tx - 3 : tx + 3, ty - 3 : ty + 3, tz - 2 : tz + 2] = 2
    label[tx - 1 : tx + 1, ty - 1 : ty + 1, tz - 1 : tz + 1] = 3
    label[~brain] = 0
    texture = rng.random(SHAPE).astype(np.float32)
    images = {}
    for k, c in enumerate(("t1n", "t1c", "t2w", "t2f")):
        img = (0.6 + 0.1 * k + 0.3 * texture + 0.8 * (label > 0) * (k - 1.5)) * brain
        images[c] = np.clip(img, 0, None).astype(np.float32) * 1000
    return images, label


def _write_case(folder, images, label=None):
    folder.mkdir(parents=True, exist_ok=True)
    for c, img in images.items():
        save_nifti(img, np.eye(4), folder / f"{c}.nii.gz")
    if label is not None:
        save_nifti(label, np.eye(4), folder / "seg.nii.gz", dtype=np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Real folder (5 cases), a synthetic copy (two contrasts only), and a noised copy."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    cases = {f"case{i}": _case(rng, (8 + i, 12, 8)) for i in range(5)}
    for cid, (images, label) in cases.items():
        _write_case(root / "real" / cid, images, label)
        _write_case(root / "copy" / cid, {c: images[c] for c in ("t1n", "t2f")})
        noised = {c: np.clip(v + rng.normal(0, 150, SHAPE).astype(np.float32) * (v > 0), 0, None) for c, v in images.items()}
        _write_case(root / "noised" / cid, noised)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(net), str(root / "features.ts"))
    return root


@pytest.mark.slow
def test_cli_comparing_a_set_with_itself(sets, tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "tools", "evaluate", "--real", str(sets / "real"), "--synthetic", str(sets / "copy"),
           "--out", str(out), "--extractor", str(sets / "features.ts"), "--extractor_mode", "2d",
           "--n_bootstrap", "20", "--n_subsamples", "20", "--n_montages", "1", "--progress", "False",
           "--feature_cache", str(tmp_path / "cache")]
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["contrasts"]) == {"t1n", "t2f"}
    assert any("t1c: absent from the synthetic set" in n for n in metrics["notes"])
    t2f = metrics["contrasts"]["t2f"]
    assert t2f["fid"]["value"] == pytest.approx(0, abs=1e-6)
    assert (t2f["fid"]["n_real"], t2f["fid"]["n_synthetic"]) == (5, 5)
    assert t2f["fid"]["ci"]["n_subsamples"] == 20 and t2f["fid"]["ci"]["low"] <= 0 <= t2f["fid"]["ci"]["high"]
    assert t2f["paired"]["n_pairs"] == 5
    for key in ("ssim_brain", "ssim_lesion"):
        assert t2f["paired"]["mean"][key] == pytest.approx(1, abs=1e-5)
    assert t2f["paired"]["mean"]["mae_brain"] == 0
    assert t2f["ms_ssim_fidelity"]["mean"] == pytest.approx(1, abs=1e-5)
    report = (out / "report.md").read_text()
    assert "## t2f" in report and "| FID | 0" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"histograms.png", "metric_vs_count.png"} <= set(pngs) and any(p.startswith("montage_00") for p in pngs)
    for p in pngs:
        assert (out / p).stat().st_size > 5000 and (out / p).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".evaluate-*"))  # no staging folder left behind


def test_api_noised_copies_score_worse_with_diversity_memorisation_and_conditioning(sets, tmp_path):
    from tests.test_metrics_segmentation import ThresholdSegmenter

    real = load_items(sets / "real")
    # a synthetic datalist: two noised samples per condition, named by source_id
    items = []
    for cid in ("case0", "case1"):
        for k in range(2):
            items.append({"id": f"{cid}_s{k}", "source_id": cid,
                          **{c: os.path.relpath(sets / ("noised" if k else "copy") / cid / f"{c}.nii.gz", tmp_path)
                             for c in ("t1n", "t2f")}})
    save_json({"testing": items}, tmp_path / "synthetic.json")
    synth = load_items(tmp_path / "synthetic.json")
    assert Path(synth[0]["t1n"]).is_absolute()
    config = EvalConfig(extractor=str(sets / "features.ts"), extractor_mode="2.5d", contrasts=("t2f", "t1c"),
                        n_bootstrap=10, n_subsamples=20, kid_subsets=10, n_montages=1, progress=False, curves=False,
                        feature_cache=str(tmp_path / "cache"))
    metrics = evaluate_sets(real, synth, tmp_path / "out", config, train_items=real,
                            segmenter=ThresholdSegmenter(), segmenter_contrasts=("t2f",))
    t2f = metrics["contrasts"]["t2f"]
    assert metrics["info"]["n_paired"] == 4 and t2f["paired"]["n_pairs"] == 4
    assert 0.2 < t2f["paired"]["mean"]["ssim_brain"] < 0.999  # half the samples are noised
    assert t2f["fid"]["value"] > 0 and t2f["kid"]["subset_size"] >= 2
    div = t2f["ms_ssim_diversity"]
    assert div["n_conditions"] == 2 and div["n_pairs"] == 2 and div["mean"] < 0.999
    mem = t2f["memorisation"]
    flagged = {s["id"] for s in mem["samples"] if s["near_copy"]}
    assert {"case0_s0", "case1_s0"} <= flagged  # exact copies of training cases are caught
    assert "t1c" not in metrics["contrasts"]
    assert "conditioning_fidelity" in metrics and metrics["conditioning_fidelity"]["n_cases"] == 4
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["contrasts"]["t2f"]["fid"]["value"] == pytest.approx(t2f["fid"]["value"])


def test_missing_extractor_weights_fail_with_a_clear_message(sets, tmp_path, monkeypatch, capsys):
    from tools.evaluate import evaluate

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit) as exited:
        evaluate(str(sets / "real"), str(sets / "copy"), str(tmp_path / "out"), progress=False)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip()  # the message lists where it looked, one line per place
    assert err.startswith("error: ") and "inception_v3_google-0cc3c7bd.pth" in err and err.endswith("nothing written")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_phantoms_in_brats_layout_against_a_partial_synthetic_copy(phantom_root, tmp_path):
    """Real BraTS-2023 phantoms through the layout reader; the synthetic copy has only FLAIR for 3 cases."""
    import shutil

    real = load_items(phantom_root)
    synth_root = tmp_path / "synthetic"
    for it in real[:3]:
        case = synth_root / Path(it["t2f"]).parent.name
        case.mkdir(parents=True)
        shutil.copy(it["t2f"], case / Path(it["t2f"]).name)
    synth = load_items(synth_root)
    assert all(it["t1n"] is None and it["t2f"] for it in synth)
    config = EvalConfig(extractor=None, n_bootstrap=10, n_montages=1, progress=False)
    metrics = evaluate_sets(real, synth, tmp_path / "out", config)
    assert list(metrics["contrasts"]) == ["t2f"]
    t2f = metrics["contrasts"]["t2f"]
    assert t2f["paired"]["n_pairs"] == 3 and t2f["paired"]["mean"]["ssim_lesion"] == pytest.approx(1, abs=1e-5)
    assert (t2f["mmd"]["n_real"], t2f["mmd"]["n_synthetic"]) == (6, 3) and "fid" not in t2f
    assert sum("absent from the synthetic set" in n for n in metrics["notes"]) == 3


def test_downstream_segmentation_files_are_scored_by_case(sets, tmp_path):
    from common.metrics import evaluate_segmentations

    real = load_items(sets / "real")[:2]
    preds = []
    for k, it in enumerate(real):
        label = load_nifti(it["label"], dtype=np.uint8)[0]
        if k == 1:
            label = np.where(label == 3, 1, label)  # ET called NETC in the second case
        save_nifti(label, np.eye(4), tmp_path / f"{it['id']}.nii.gz", dtype=np.uint8)
        preds.append({"id": it["id"], "label": str(tmp_path / f"{it['id']}.nii.gz")})
    res = evaluate_segmentations(preds, real, progress=False)
    assert res["n_cases"] == 2
    assert res["per_case"]["case0"]["per_region"]["ET"]["dice"] == pytest.approx(1)
    assert res["per_case"]["case1"]["per_region"]["ET"]["dice"] == 0
    assert res["mean"]["per_region"]["ET"]["dice"] == pytest.approx(0.5)
    assert res["mean"]["per_region"]["WT"]["dice"] == pytest.approx(1)
    with pytest.raises(ValueError, match="no reference"):
        evaluate_segmentations([{"id": "nope", "label": preds[0]["label"]}], real, progress=False)


def _numbers(obj, prefix=""):
    """Flatten a metrics dict to {path: number} for exact comparisons."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_numbers(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}/{i}"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def _grouped_synthetic(sets, tmp_path):
    items = []
    for cid in ("case0", "case1", "case2"):
        for k, folder in enumerate(("copy", "noised", "noised")):
            items.append({"id": f"{cid}_s{k}", "source_id": cid,
                          **{c: str(sets / folder / cid / f"{c}.nii.gz") for c in ("t1n", "t2f")}})
    return items


@pytest.mark.slow  # four evaluations of 14 cases and 4 pairs
def test_two_shards_merged_equal_one_process(sets, tmp_path):
    from common.metrics.evaluate import evaluate_shard, merge_shards

    real, synth = load_items(sets / "real"), _grouped_synthetic(sets, tmp_path)
    config = EvalConfig(extractor=str(sets / "features.ts"), extractor_mode="2d", contrasts=("t2f",),
                        n_bootstrap=10, n_subsamples=10, kid_subsets=5, n_montages=0, progress=False, curves=False,
                        diversity_pairs=4, feature_cache=None)
    single = evaluate_sets(real, synth, tmp_path / "single", config)
    for i in (1, 0):  # any order
        evaluate_shard(real, synth, tmp_path / "sharded", f"{i}/2", config)
    merged = merge_shards(real, synth, tmp_path / "sharded", config)
    a, b = _numbers(single["contrasts"]), _numbers(merged["contrasts"])
    assert a.keys() == b.keys() and len(a) > 30
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    t2f = merged["contrasts"]["t2f"]
    assert t2f["ms_ssim_diversity"]["n_pairs"] == 4 and t2f["ms_ssim_diversity"]["n_pairs_possible"] == 9
    assert merged["info"]["shards"] == 2 and (tmp_path / "sharded" / "report.md").exists()
    # a shard written for other settings is refused, naming the file
    evaluate_shard(real, synth, tmp_path / "stale", "0/2", config)
    evaluate_shard(real, synth, tmp_path / "stale", "1/2", EvalConfig(**{**config.to_dict(), "seed": 5}))
    with pytest.raises(ValueError, match="shard-1-of-2.pt: written for other items or settings"):
        merge_shards(real, synth, tmp_path / "stale", config)
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        evaluate_shard(real, synth, tmp_path / "partial", "0/3", config)
        evaluate_shard(real, synth, tmp_path / "partial", "2/3", config)
        merge_shards(real, synth, tmp_path / "partial", config)


def test_second_run_reads_the_real_features_from_the_cache(sets, tmp_path):
    real = load_items(sets / "real")
    config = EvalConfig(extractor=str(sets / "features.ts"), extractor_mode="2d", contrasts=("t2f", "t1n"),
                        n_subsamples=5, kid_subsets=5, n_montages=0, progress=False, curves=False,
                        feature_cache=str(tmp_path / "cache"))
    first = evaluate_sets(real, load_items(sets / "copy"), tmp_path / "a", config)
    # the copy's files are byte-identical to the real ones: the content hash already finds them
    assert first["feature_cache"]["misses"] == 10 and first["feature_cache"]["hits"] == 10
    second = evaluate_sets(real, load_items(sets / "noised"), tmp_path / "b", config)
    assert second["feature_cache"]["hits"] == 10  # all 5 real cases x 2 contrasts
    assert second["feature_cache"]["misses"] == 10  # the new synthetic set
    assert "feature cache: 10 read, 10 computed" in (tmp_path / "b" / "report.md").read_text()
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 20
    fresh = evaluate_sets(real, load_items(sets / "noised"), tmp_path / "c", EvalConfig(**{**config.to_dict(),
                          "feature_cache": None}))
    assert fresh["contrasts"]["t2f"]["fid"]["value"] == pytest.approx(second["contrasts"]["t2f"]["fid"]["value"])


@pytest.mark.slow  # two spawned worker processes import torch and MONAI
def test_two_workers_equal_one(sets, tmp_path):
    real, synth = load_items(sets / "real"), _grouped_synthetic(sets, tmp_path)
    config = EvalConfig(extractor=str(sets / "features.ts"), extractor_mode="2d", contrasts=("t2f",),
                        n_bootstrap=10, n_subsamples=10, kid_subsets=5, n_montages=0, progress=False, curves=False,
                        feature_cache=None)
    one = evaluate_sets(real, synth, tmp_path / "one", config)
    two = evaluate_sets(real, synth, tmp_path / "two", EvalConfig(**{**config.to_dict(), "workers": 2}))
    a, b = _numbers(one["contrasts"]), _numbers(two["contrasts"])
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert two["info"]["workers"] == 2
