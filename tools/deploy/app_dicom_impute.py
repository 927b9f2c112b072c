"""MONAI Deploy app: a DICOM MR series in -> the imputed contrast as a new DICOM series (one request, then it exits).

    python tools/deploy/app_dicom_impute.py -i T2_SERIES_DIR -o OUT                    # FLAIR from T2 (default)
    python tools/deploy/app_dicom_impute.py --task impute_t1 -i T1C_SERIES_DIR -o OUT  # T1 from T1c

Graph (``tools.deploy.graphs.DicomImputeApp``): DicomSeriesLoaderOperator (CountCondition 1; slices sorted by
ImagePositionPatient, LPS -> RAS NIfTI) -> ServeTaskOperator (the cGAN bundle's own inference config) ->
DicomSeriesWriterOperator (``OUT/synthetic-<image>/``: one file per source slice with its geometry, new Series and
SOP Instance UIDs, ImageType DERIVED\\SECONDARY, a SeriesDescription that says SYNTHETIC and not for diagnosis).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root, not this folder, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from common.bundle.serve import request_params, task_spec  # noqa: E402  (light: no MONAI yet)
from tools.deploy.dicom import SYNTHETIC_SERIES, check_series_folder  # noqa: E402
from tools.deploy.runner import SDK_OPTIONS, check_output_dir, main_guard, peek_paths, run_graph, split_argv  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/deploy/app_dicom_impute.py", epilog=SDK_OPTIONS,
                                description="Impute a missing MR contrast from one DICOM series, as a new series.")
    p.add_argument("--task", default=os.environ.get("BRATS_SYNTH_TASK", "impute_flair"),
                   choices=sorted(SYNTHETIC_SERIES), help="impute_flair: FLAIR from T2; impute_t1: T1 from T1c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="demo", choices=("demo", "paper"), help="shipped demo weights or paper-size")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    return p


def main(argv: list[str]) -> int:
    opts, sdk_argv = split_argv(parser(), argv)
    params = request_params(task_spec(opts.task), {"seed": opts.seed})
    given_input, given_output = peek_paths(sdk_argv)
    check_series_folder(given_input)
    check_output_dir(given_output)

    from tools.deploy.graphs import Application, DicomImputeApp

    context = Application.init_app_context(sdk_argv)  # the SDK's own -i/-o/-w resolution (and env variables)
    input_dir = check_series_folder(context.input_path)
    out = check_output_dir(context.output_path, make=True)
    state = run_graph(DicomImputeApp, context, "deploy-dicom-", task=opts.task, params=params, input_dir=input_dir,
                      output=out, config=opts.config, device=opts.device)
    print(f"{SYNTHETIC_SERIES[opts.task][0]}: {state['written']}")
    return 0


if __name__ == "__main__":
    main_guard(main)
