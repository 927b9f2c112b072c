"""Small helpers shared by several test files (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

# every header field that places a volume in space: an output "on the source grid" keeps all of them
GRID_HEADER_FIELDS = ("dim", "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
                      "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units")


def bundle_command(bundle: Path, env: dict, args: list[str], timeout: float = 900, runner: list[str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` (or ``runner + args``) from the bundle folder; asserts success by default."""
    cmd = (runner or [sys.executable, "-m", "monai.bundle"]) + list(args)
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def assert_imputed_on_source_grid(output: str, source: str) -> np.ndarray:
    """An imputed image has its source's shape, affine and spatial header, values in [0, 1] and zero background;
    returns its voxels."""
    import nibabel as nib

    out, src = nib.load(output), nib.load(source)
    assert out.shape == src.shape
    np.testing.assert_array_equal(out.affine, src.affine)
    for field in GRID_HEADER_FIELDS:
        np.testing.assert_array_equal(out.header[field], src.header[field], err_msg=field)
    data = np.asarray(out.dataobj)
    assert data.min() >= 0 and data.max() <= 1 and data.any()
    assert not data[np.asarray(src.dataobj) == 0].any()  # background stays background
    return data


def tracking_args(output_dir: Path) -> list[str]:
    """``--tracking mlflow`` (MONAI's settings: SQLite store ``<output_dir>/mlruns.db``) with the executed config
    saved as an artifact. ``--save_execute_config`` is given because with a literal ``--output_dir`` MONAI 1.6
    records the artifact as the string "<dir> + '/config_<time>.json'", a file that does not exist."""
    return ["--tracking", "mlflow", "--save_execute_config", str(Path(output_dir) / "executed_config.json")]


def mlflow_runs(output_dir: Path) -> list[dict]:
    """Every run in ``<output_dir>/mlruns.db``, oldest first: status, params, metric histories, artifact names."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(output_dir).resolve() / 'mlruns.db'}")
    runs = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
            run_id = run.info.run_id
            runs.append({
                "status": run.info.status, "params": dict(run.data.params),
                "metrics": {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
                            for k in run.data.metrics},
                "artifacts": [a.path for a in client.list_artifacts(run_id)],
            })
    return runs


def assert_tracked(run: dict, losses: list[float], validation_metric: str) -> None:
    """The MLflow run holds what the log printed: every training loss (in order), the validation metric, the
    trainer's parameters and the executed config."""
    assert run["status"] == "FINISHED"
    assert {"max_epochs", "epoch_length"} <= set(run["params"]), run["params"]
    np.testing.assert_allclose(run["metrics"]["train_loss"], losses, rtol=1e-3, atol=1e-4)  # the log rounds
    assert run["metrics"].get(validation_metric), sorted(run["metrics"])
    assert "executed_config.json" in run["artifacts"], run["artifacts"]


def tensorboard_images(log_dir: Path) -> dict[str, list]:
    """Image summaries under ``log_dir`` (every event file): tag -> [(step, height, width)]."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    found: dict[str, list] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={IMAGES: 0})
        acc.Reload()
        for tag in acc.Tags()[IMAGES]:
            found.setdefault(tag, []).extend((e.step, e.height, e.width) for e in acc.Images(tag))
    return found


def serve_study(root: Path) -> dict:
    """One phantom case (64x64x40, BraTS 2023 names) under ``root`` and its GliomaGen 6-label mask on the bundle's
    grid: the inputs of every serving task (``common.bundle.serve``)."""
    import glob

    from common.bundle import prepare_cases
    from common.data.datalist import build_datalist
    from common.phantom import make_phantoms

    make_phantoms(root / "data", n=1, shape=(64, 64, 40), layout="brats2023", seed=3, progress=False)
    build_datalist(root / "data", root / "datalist.json", folds=1, val_fold=0, progress=False)
    (prepared,) = prepare_cases(root / "datalist.json", root / "prepared", "brats_mri_gliomagen",
                                ["inference.json", "demo.json"], section=["training", "validation"], progress=False)
    case = {c: glob.glob(str(root / "data" / "*" / f"*-{c}.nii.gz"))[0] for c in ("t1c", "t2w", "seg")}
    return {**case, "six_label": prepared["label"], "root": root}
