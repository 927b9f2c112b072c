"""``python -m tools tune``: the command-line face of ``common.cgan_imputation.tune.run_search``."""

from __future__ import annotations

from common.errors import fail


def _mapping(value, what: str) -> dict | None:
    """A JSON file, a JSON string, or a dict (fire parses ``{...}`` itself)."""
    import json
    from pathlib import Path
    from common.io import DataError

    if value is None or isinstance(value, dict):
        return value
    text = Path(value).read_text() if Path(str(value)).is_file() else str(value)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--{what}", f"not a JSON object or file ({exc}); fix: e.g. --{what} space.json") from exc
    if not isinstance(data, dict):
        raise DataError(f"--{what}", "must be a JSON object")
    return data


def tune(
    objective: str,
    out: str = "tune",
    n_trials: int = 20,
    storage: str | None = None,
    study_name: str = "cgan_imputation",
    workers: int = 1,
    seed: int = 0,
    timeout: float | None = None,
    space: str | None = None,
    config_ids: str | None = None,
    plots: bool = True,
) -> str:
    """Bayesian (Optuna TPE) search of lr, batch size, batch samples, L1 and mask-loss weights, maximising the
    mean validation SSIM; resumable; writes the best parameters as a bundle config overlay.

    Args:
        objective: ``package.module:function`` with ``function(params, report) -> float``; ``report(step, value)``
            feeds intermediate validation SSIMs to the median pruner.
        out: folder for study.db (the default storage), best_overlay.json, summary.json and the PNG plots.
        n_trials: finished (completed + pruned) trials to reach, counting those of earlier runs of the study.
        storage: database URL Optuna accepts (sqlite:///..., postgresql://...) or an SQLite file path;
            default ``<out>/study.db``. A killed search resumes from it.
        study_name: the study inside the database.
        workers: processes searching the same study on this machine.
        seed: TPE sampler seed (worker i uses seed + 1000 i).
        timeout: stop starting trials after this many seconds.
        space: JSON (file or string) replacing parts of the search space, e.g.
            '{"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": true}}'.
        config_ids: JSON mapping parameter names to the bundle's config ids for the overlay.
        plots: write optimization_history.png and param_importances.png.
    Returns:
        The path of the best-parameter overlay (or of the summary when no trial completed).
    """
    import sys

    from common.cgan_imputation.tune import SEARCH_SPACE, run_search
    from common.io import DataError

    try:
        extra = _mapping(space, "space") or {}
        unknown = sorted(set(extra) - set(SEARCH_SPACE))
        if unknown:
            raise DataError("--space", f"unknown parameters {unknown}; the search has {sorted(SEARCH_SPACE)}")
        summary = run_search(
            objective, out, n_trials=int(n_trials), storage=storage, study_name=study_name,
            space={**SEARCH_SPACE, **extra}, config_ids=_mapping(config_ids, "config_ids"), seed=int(seed),
            workers=int(workers), timeout=timeout, plots=plots if isinstance(plots, bool) else str(plots).lower() == "true",
        )
    except DataError as err:
        fail(err)
    print(f"{summary['n_trials']} trials in {summary['storage']}; best mean validation SSIM "
          f"{summary.get('best_value')} (trial {summary.get('best_trial')})", file=sys.stderr)
    return summary.get("overlay") or str(f"{out}/summary.json")
