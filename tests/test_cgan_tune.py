"""Optuna TPE search: resumes after SIGKILL with earlier trials kept, prunes, writes the overlay; 2 workers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from common.cgan_imputation.tune import (PAPER_FOUND, SEARCH_SPACE, paper_overlay, run_search,  # noqa: E402
                                         storage_url)

ROOT = Path(__file__).resolve().parents[1]

OBJECTIVES = textwrap.dedent('''
    import math, os, time

    def peaked(params, report):
        """Best near lr 1e-4 and L1 weight 100; three intermediate reports for the pruner."""
        delay = float(os.environ.get("CHEAP_DELAY", "0"))
        score = 1 - (math.log10(params["learning_rate"]) + 4) ** 2 / 4 - ((params["l1_weight"] - 100) / 200) ** 2
        for step in range(3):
            time.sleep(delay)
            report(step, score * (step + 1) / 3)
        return score

    def sleepy(params, report):
        """Sleep-bound, like a trial waiting on a GPU: workers should overlap."""
        time.sleep(float(os.environ.get("SLEEPY_SECONDS", "0.6")))
        return params["l1_weight"] / 200
''')


@pytest.fixture
def objectives(tmp_path, monkeypatch):
    (tmp_path / "cgan_cheap_objectives.py").write_text(OBJECTIVES)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    import importlib

    return importlib.import_module("cgan_cheap_objectives")


def _finished(url: str) -> dict[int, dict]:
    study = optuna.load_study(study_name="cgan_imputation", storage=url)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {t.number: t.params for t in study.get_trials(states=done)}


def _finished_so_far(db: Path) -> int:
    """Finished trials in a study another process is writing, read through a read-only SQLite connection: optuna's
    own storage would create the tables if they are missing, racing the search process that is creating them."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            (n,) = con.execute("SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()
    except sqlite3.OperationalError:  # no tables yet, or locked for a moment
        return 0
    return n


@pytest.mark.slow  # a search process in a fresh interpreter, killed and resumed
def test_killed_search_resumes_with_earlier_trials_and_writes_overlay(objectives, tmp_path):
    out = tmp_path / "search"
    url = storage_url(None, out)
    env = dict(os.environ, OMP_NUM_THREADS="1", CHEAP_DELAY="0.4",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    proc = subprocess.Popen([sys.executable, "-m", "tools", "tune", "--objective", "cgan_cheap_objectives:peaked",
                             "--out", str(out), "--n_trials", "10", "--seed", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if _finished_so_far(out / "study.db") >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = _finished(url)
    assert 3 <= len(before) < 10 and not (out / "best_overlay.json").exists()

    summary = run_search(objectives.peaked, out, n_trials=10, seed=1)
    after = _finished(url)
    assert len(after) == 10 and summary["resumed_with_finished"] == len(before)
    assert {n: after[n] for n in before} == before  # the killed run's trials are kept as they were
    assert summary["n_trials"].get("PRUNED", 0) >= 1  # the median pruner stopped poor trials
    overlay = json.loads((out / "best_overlay.json").read_text())
    assert overlay == summary["best_params"] and set(overlay) == set(PAPER_FOUND["t2w_t2f"])
    study = optuna.load_study(study_name="cgan_imputation", storage=url)
    assert overlay["learning_rate"] == study.best_params["learning_rate"]
    assert (out / "optimization_history.png").stat().st_size > 1000
    assert (out / "param_importances.png").stat().st_size > 1000


def test_overlay_uses_the_bundle_config_ids(objectives, tmp_path):
    ids = {"learning_rate": "lr", "mask_weight": "losses#lesion#weight"}
    summary = run_search(objectives.peaked, tmp_path, n_trials=4, config_ids=ids, plots=False,
                         storage=str(tmp_path / "other.db"))
    overlay = json.loads((tmp_path / "best_overlay.json").read_text())
    assert overlay["lr"] == summary["best_params"]["learning_rate"]
    assert overlay["losses#lesion#weight"] == summary["best_params"]["mask_weight"]
    assert summary["storage"].endswith("other.db") and summary["n_trials"]["COMPLETE"] >= 3
    again = run_search(objectives.peaked, tmp_path, n_trials=4, plots=False, storage=str(tmp_path / "other.db"))
    assert again["resumed_with_finished"] == 4 and sum(again["n_trials"].values()) == 4  # nothing left to run
    assert paper_overlay("t1c_t1n", ids)["lr"] == 0.000149


@pytest.mark.slow  # two spawned worker processes
def test_two_workers_share_one_sqlite_study(objectives, tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEPY_SECONDS", "0.8")
    n = 10
    one = run_search(objectives.sleepy, tmp_path / "one", n_trials=n, plots=False)
    two = run_search("cgan_cheap_objectives:sleepy", tmp_path / "two", n_trials=n, workers=2, plots=False)
    finished = sum(two["n_trials"].get(s, 0) for s in ("COMPLETE", "PRUNED"))
    assert n <= finished <= n + 1  # each worker stops once n have finished; one may be mid-trial then
    t1, t2 = one["seconds_this_run"], two["seconds_this_run"]
    s1, s2 = one["trial_span_s"], two["trial_span_s"]
    print(f"\n{n} sleep-bound trials (0.8 s): 1 worker {t1:.1f} s, 2 workers {t2:.1f} s wall with start-up; "
          f"first trial start to last end {s1:.1f} s vs {s2:.1f} s ({s1 / s2:.2f}x)")
    assert s2 < 0.8 * s1  # the trials overlap; the wall time also pays two fresh interpreters' imports


BUNDLE_TRAIN = {
    "imports": ["$import math"],
    "learning_rate": 0.0002,
    "l1_weight": 100.0,
    "score": "$1.0 - abs(math.log10(@learning_rate) + 4.0) / 4 - abs(@l1_weight - 100.0) / 400",
    "tune_report": "$lambda step, value: None",
    "train": "$[@tune_report(s, @score * (s + 1) / 3) for s in range(3)]",
}


def test_bundle_objective_trains_through_run_bundle(tmp_path):
    """The trial's parameters reach the bundle as config overrides; its validation reports through @tune_report."""
    configs = tmp_path / "bundle" / "configs"
    configs.mkdir(parents=True)
    (configs / "metadata.json").write_text(json.dumps({"version": "0.1.0", "changelog": {"0.1.0": "test"}}))
    (configs / "logging.conf").write_text((ROOT / "bundles/brats_mri_ldm3d/configs/logging.conf").read_text())
    (configs / "train.json").write_text(json.dumps(BUNDLE_TRAIN))
    from common.cgan_imputation.bundle import BundleObjective

    objective = BundleObjective(tmp_path / "bundle", ["train.json"], run_id="train")
    seen = []
    value = objective({"learning_rate": 1e-3, "l1_weight": 100.0}, lambda step, v: seen.append((step, v)))
    assert value == pytest.approx(0.75) and [s for s, _ in seen] == [0, 1, 2]
    space = {k: v for k, v in SEARCH_SPACE.items() if k in ("learning_rate", "l1_weight")}
    summary = run_search(objective, tmp_path / "search", n_trials=3, space=space, plots=False)
    best = summary["best_params"]
    score = 1 - abs(math.log10(best["learning_rate"]) + 4) / 4 - abs(best["l1_weight"] - 100) / 400
    assert summary["best_value"] == pytest.approx(score)
