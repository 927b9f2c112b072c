"""Figure-5 evaluation: predicted-vs-target against input-vs-target, brain and lesion, mean ± std, scatter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.cgan_imputation.evaluate import evaluate_scans, pair_cases, score_generator, write_report
from common.cgan_imputation.networks import build_generator
from common.data import read_layout
from common.io import DataError, load_nifti


@pytest.fixture(scope="module")
def items(phantom_root):
    return [it for it in read_layout(phantom_root) if load_nifti(it["label"])[0].any()][:2]


def _cases(items, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = []
    for it in items:
        target, _, _ = load_nifti(it["t2f"])
        pred = np.where(target != 0, target + noise * target.std() * rng.standard_normal(target.shape), 0)
        cases.append({"id": it["id"], "predicted": pred.astype(np.float32), "target": it["t2f"],
                      "input": it["t2w"], "label": it["label"]})
    return cases


def test_close_prediction_beats_the_input_everywhere(items):
    report = evaluate_scans(_cases(items, noise=0.02))
    s = report["summary"]
    assert report["n_scans"] == len(items) == s["ssim_brain"]["n_scans"]
    for metric in ("ssim_brain", "ssim_lesion", "psnr_brain", "mae_brain", "mae_lesion"):
        assert s[metric]["better"] == 1.0, metric  # MAE: lower counts as better
    assert s["ssim_brain"]["predicted"]["mean"] > s["ssim_brain"]["input"]["mean"]
    assert s["ssim_brain"]["predicted"]["std"] >= 0 and s["ssim_lesion"]["predicted"]["n"] == len(items)
    exact = evaluate_scans([{**c, "predicted": c["target"]} for c in _cases(items, 0.0)])["summary"]
    assert exact["ssim_brain"]["predicted"]["mean"] == pytest.approx(1.0)
    assert exact["mae_lesion"]["predicted"]["mean"] == 0.0


def test_report_and_scatter(items, tmp_path):
    reports = {"without mask loss": evaluate_scans(_cases(items, 0.3)),
               "with mask loss": evaluate_scans(_cases(items, 0.1, seed=1))}
    paths = write_report(reports, tmp_path, "t2w -> t2f")
    data = json.loads((tmp_path / "evaluation.json").read_text())
    assert set(data["models"]) == set(reports)
    noisy, clean = (data["models"][k]["summary"]["ssim_lesion"]["predicted"]["mean"] for k in reports)
    assert clean > noisy
    assert (tmp_path / "ssim_scatter.png").stat().st_size > 5000 and paths["scatter"].endswith(".png")


def test_pairing_and_errors(items, tmp_path):
    cases = pair_cases(items, {it["id"]: it["t2f"] for it in items}, "t2w", "t2f")
    assert [c["input"] for c in cases] == [it["t2w"] for it in items]
    with pytest.raises(DataError, match="no imputed t2f"):
        pair_cases(items, {}, "t2w", "t2f")
    bad = _cases(items[:1], 0.0)
    bad[0]["predicted"] = bad[0]["predicted"][:-1]
    with pytest.raises(DataError, match="predicted shape"):
        evaluate_scans(bad)


def test_score_generator_in_memory(items, one_torch_thread):
    torch.manual_seed(0)
    report = score_generator(build_generator(1, "demo"), items[:2], ("t2w",), "t2f", spatial_size=(64, 64))
    assert report["n_scans"] == 2
    assert -1 <= report["summary"]["ssim_brain"]["predicted"]["mean"] <= 1


def test_evaluate_imputed_datasets_against_a_datalist(phantom_root, tmp_path, one_torch_thread):
    from common.cgan_imputation.evaluate import evaluate_imputed
    from common.cgan_imputation.impute import impute_dataset
    from common.data import build_datalist

    build_datalist(phantom_root, tmp_path / "datalist.json", folds=3, progress=False)
    torch.manual_seed(0)
    impute_dataset(phantom_root, build_generator(1, "demo"), "t2w", "t2f", output=tmp_path / "imputed",
                   spatial_size=(64, 64), progress=False)
    out = evaluate_imputed(tmp_path / "datalist.json", {"demo": tmp_path / "imputed"}, "t2w", "t2f", tmp_path / "eval")
    n_val = len(json.loads((tmp_path / "datalist.json").read_text())["validation"])
    assert out["reports"]["demo"]["n_scans"] == n_val >= 1
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["title"] == "t2w -> t2f"
    # the acquired FLAIRs were left alone: imputation went into the copy
    assert not list(phantom_root.rglob("*-t2f.json"))
