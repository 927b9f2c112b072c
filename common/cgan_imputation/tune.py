"""Bayesian hyper-parameter search of Genc et al. (2022) with Optuna's TPE sampler.

Searched (``SEARCH_SPACE``): learning rate, batch size (volumes per step), batch samples (slices per volume), the
L1 weight and the lesion-mask loss weight; maximised: the mean validation SSIM. The paper's found values are in
``PAPER_FOUND`` (T1c -> T1 and T2 -> FLAIR).

The trial runner is pluggable: ``objective(params, report) -> float`` gets the suggested parameters (names of
``SEARCH_SPACE``) and a ``report(step, value)`` callback that feeds intermediate validation scores to the pruner
(a ``MedianPruner``: a trial whose score at a step is below the median of earlier trials at that step is stopped;
``report`` then raises ``optuna.TrialPruned``). ``common.cgan_imputation.bundle.BundleObjective`` plugs in the
bundle's own training (its validation reports through ``@tune_report``).

The study lives in a database: an SQLite file ``<out>/study.db`` by default, so a killed search resumes where it
stopped (finished trials are kept, ``n_trials`` counts them), or any database URL Optuna accepts, so workers on
several machines share one study. ``workers`` runs that many processes on one study here. Trials of a killed
process stay RUNNING until their heartbeat is ``grace_period`` seconds old; a later run then marks them failed.

Results (atomic): ``best_overlay.json`` -- the best parameters as a bundle config overlay (JSON of config ids,
``CONFIG_IDS`` maps parameter names to ids); ``summary.json``; ``optimization_history.png`` and
``param_importances.png`` (PED-ANOVA importances, which need no scikit-learn).
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from datetime import datetime
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Mapping

from common.io import DataError, atomic_path, check_output, save_json

Objective = Callable[[dict, Callable[[int, float], None]], float]

SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "batch_size": {"type": "int", "low": 1, "high": 8, "log": True},
    "batch_samples": {"type": "int", "low": 1, "high": 8},
    "l1_weight": {"type": "float", "low": 1.0, "high": 200.0},
    "mask_weight": {"type": "float", "low": 0.0, "high": 200.0},
}
CONFIG_IDS = {name: name for name in SEARCH_SPACE}
PAPER_FOUND = {  # Genc et al. 2022, Results
    "t1c_t1n": {"learning_rate": 0.000149, "batch_size": 2, "batch_samples": 4, "l1_weight": 90.24,
                "mask_weight": 124.85},
    "t2w_t2f": {"learning_rate": 0.0000487, "batch_size": 2, "batch_samples": 2, "l1_weight": 118.74,
                "mask_weight": 151.04},
}
STUDY_NAME = "cgan_imputation"
FINISHED = ("COMPLETE", "PRUNED")


def paper_overlay(task: str, config_ids: Mapping[str, str] | None = None) -> dict:
    """The paper's found values of ``task`` (``t1c_t1n`` or ``t2w_t2f``) as a config overlay."""
    if task not in PAPER_FOUND:
        raise ValueError(f"unknown task {task!r}; the paper tuned {sorted(PAPER_FOUND)}")
    ids = {**CONFIG_IDS, **(config_ids or {})}
    return {ids[k]: v for k, v in PAPER_FOUND[task].items()}


def suggest(trial, space: Mapping[str, Mapping] = SEARCH_SPACE) -> dict:
    """One value per parameter of ``space`` from the trial's sampler."""
    params = {}
    for name, spec in space.items():
        kind = spec.get("type", "float")
        if kind == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec["choices"]))
        else:
            raise ValueError(f"search space {name}: type must be float, int or categorical, got {kind!r}")
    return params


def resolve_objective(objective: str | Objective) -> Objective:
    """A callable, or ``"package.module:function"`` (what worker processes and the CLI receive)."""
    if callable(objective):
        return objective
    module, _, name = str(objective).partition(":")
    if not module or not name:
        raise DataError("--objective", f"must be 'package.module:function', got {objective!r}")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise  # the module exists but one of its own imports is missing: a bug or an install problem
        raise DataError("--objective", f"no module {module!r} on the Python path (working folder or PYTHONPATH)") from None
    fn = getattr(found, name, None)
    if not callable(fn):
        raise DataError("--objective", f"{module} has no callable {name!r}")
    return fn


def storage_url(storage: str | None, out_dir: str | os.PathLike) -> str:
    """``None`` -> the SQLite file ``<out_dir>/study.db``; a path ending in .db -> that SQLite file; else a URL."""
    if storage is None:
        storage = str(Path(out_dir).resolve() / "study.db")
    if "://" not in str(storage):
        Path(storage).resolve().parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(storage).resolve()}"
    return str(storage)


def make_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120):
    """RDB storage with trial heartbeats (stale RUNNING trials of a killed process are failed later) and, for
    SQLite, a long lock timeout so several worker processes can share the file."""
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.x
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period)


def _n_finished(study) -> int:
    import optuna

    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    return len(study.get_trials(deepcopy=False, states=states))


def _optimize(study, objective: Objective, n_trials: int, space: Mapping, timeout: float | None) -> None:
    import optuna

    def run(trial) -> float:
        params = suggest(trial, space)

        def report(step: int, value: float) -> None:
            trial.report(float(value), int(step))
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: {value:.4g} below the median of earlier trials")

        value = float(objective(params, report))
        if not math.isfinite(value):
            raise ValueError(f"objective returned {value} for {params}")
        return value

    states = tuple(getattr(optuna.trial.TrialState, s) for s in FINISHED)
    if _n_finished(study) >= n_trials:
        return
    study.optimize(run, n_trials=None, timeout=timeout,  # a broken objective stops the search loudly
                   callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=states)])


def _worker(url: str, study_name: str, objective, n_trials: int, space: Mapping, seed: int,
            timeout: float | None, heartbeat: tuple[int, int]) -> int:
    """One search process on the shared study (its own sampler seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=make_storage(url, *heartbeat),
                              sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner())
    _optimize(study, resolve_objective(objective), n_trials, space, timeout)
    return os.getpid()


def _pruner(n_startup_trials: int = 3, n_warmup_steps: int = 1):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)


def run_search(objective: str | Objective, out_dir: str | os.PathLike, n_trials: int = 20,
               storage: str | None = None, study_name: str = STUDY_NAME, space: Mapping | None = None,
               config_ids: Mapping[str, str] | None = None, seed: int = 0, workers: int = 1,
               timeout: float | None = None, plots: bool = True, heartbeat_interval: int = 30,
               grace_period: int = 120, verbose: bool = False) -> dict:
    """Run (or resume) the search until ``n_trials`` trials have finished (completed or pruned); write the overlay,
    summary and plots into ``out_dir``; return the summary.

    ``workers > 1`` needs an ``objective`` that a fresh process can import (a ``"module:function"`` string or a
    module-level function). Several workers may finish up to ``workers - 1`` trials more than ``n_trials``.
    """
    import optuna

    if n_trials < 1:
        raise DataError("--n_trials", f"must be >= 1, got {n_trials}")
    if workers < 1:
        raise DataError("--workers", f"must be >= 1, got {workers}")
    resolve_objective(objective)  # a wrong name is refused before the study database is made
    space = dict(space or SEARCH_SPACE)
    out_dir = check_output(out_dir, "dir", flag="out")
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out_dir)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=make_storage(url, heartbeat_interval, grace_period),
                                direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner())
    before = _n_finished(study)
    started_at = datetime.now()  # optuna stores naive local times
    start = time.perf_counter()
    if workers == 1:
        _optimize(study, resolve_objective(objective), n_trials, space, timeout)
    else:
        ctx = get_context("spawn")  # a clean interpreter per worker: no forked database connections or threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            jobs = [pool.submit(_worker, url, study_name, objective, n_trials, space, seed + 1000 * (i + 1), timeout,
                                (heartbeat_interval, grace_period)) for i in range(workers)]
            for job in jobs:
                job.result()
    seconds = time.perf_counter() - start
    return summarise(study, out_dir, config_ids, plots=plots,
                     extra={"storage": url, "resumed_with_finished": before, "workers": workers,
                            "seconds_this_run": round(seconds, 3), "trial_span_s": _trial_span(study, started_at),
                            "n_trials_requested": n_trials,
                            "search_space": space})


def _trial_span(study, since: datetime) -> float | None:
    """Seconds from the first trial start to the last trial end of this run (worker start-up excluded)."""
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.datetime_start and t.datetime_complete and t.datetime_start >= since]
    if not trials:
        return None
    first = min(t.datetime_start for t in trials)
    return round((max(t.datetime_complete for t in trials) - first).total_seconds(), 3)


def summarise(study, out_dir: str | os.PathLike, config_ids: Mapping[str, str] | None = None, plots: bool = True,
              extra: Mapping | None = None) -> dict:
    """Best-parameter overlay, summary JSON and plots of a study (also usable on a study loaded later)."""
    import optuna

    out_dir = Path(out_dir)
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    summary: dict[str, Any] = {"study_name": study.study_name, "direction": "maximize", "metric": "mean validation SSIM",
                               "n_trials": {k: v for k, v in counts.items() if v}, **(extra or {})}
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if completed:
        best = study.best_trial
        ids = {**CONFIG_IDS, **(config_ids or {})}
        overlay = {ids.get(k, k): v for k, v in best.params.items()}
        save_json(overlay, out_dir / "best_overlay.json")
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params,
                       overlay=str(out_dir / "best_overlay.json"))
    if plots:
        summary["plots"] = _plots(study, out_dir, len(completed))
    save_json(summary, out_dir / "summary.json")
    return summary


def _save_axes(ax, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return str(path)


def _plots(study, out_dir: Path, n_completed: int) -> dict:
    """Optimisation history and parameter importances (PNG); a plot that cannot be drawn yet says why."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    out: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        if n_completed:
            out["history"] = _save_axes(ovm.plot_optimization_history(study), out_dir / "optimization_history.png")
        else:
            out["history"] = "not drawn: no completed trial"
        try:
            if n_completed < 2:
                raise ValueError("needs 2 or more completed trials")
            ax = ovm.plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
            out["importances"] = _save_axes(ax, out_dir / "param_importances.png")
        except (ValueError, RuntimeError) as exc:
            out["importances"] = f"not drawn: {exc}"
    return out

