"""MONAI Deploy app: NIfTI in -> NIfTI out for every serving task of the collection (one request, then it exits).

    python tools/deploy/app.py --task ldm3d -i MASK.nii.gz -o OUT     # -i: a NIfTI file, or a folder with one
    python tools/deploy/app.py --task vqgan --class LGG -o OUT        # no input

Graph (``tools.deploy.graphs.ServeTaskApp``): InputPathOperator (CountCondition 1) -> ServeTaskOperator
(``common.bundle.serve.run_task``: the bundle's own inference config) -> NiftiWriterOperator
(``OUT/<case>-<image>.nii.gz`` on the input's grid, and ``OUT/<case>-request.json``). The request is checked before
MONAI is imported, so a mistake costs a second, not ten. The task can also come from ``$BRATS_SYNTH_TASK`` (a MAP
container runs the app without options).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root, not this folder, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from common.bundle.serve import TASKS, request_params, task_spec  # noqa: E402  (light: no MONAI yet)
from tools.deploy.runner import (  # noqa: E402
    SDK_OPTIONS,
    check_output_dir,
    main_guard,
    peek_paths,
    resolve_nifti,
    run_graph,
    split_argv,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/deploy/app.py", epilog=SDK_OPTIONS,
                                description="Run one serving task of the collection on one NIfTI input.")
    p.add_argument("--task", default=os.environ.get("BRATS_SYNTH_TASK"), choices=sorted(TASKS),
                   help="serving task (default: $BRATS_SYNTH_TASK)")
    p.add_argument("--seed", type=int, help="sample seed (default 0)")
    p.add_argument("--steps", type=int, help="sampler steps (ldm3d, gliomagen: num_inference_steps; vqgan: steps)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (ldm3d, gliomagen)")
    p.add_argument("--class", dest="grade", choices=("LGG", "HGG"), help="vqgan: tumor grade (default HGG)")
    p.add_argument("--config", default="demo", choices=("demo", "paper"), help="shipped demo weights or paper-size")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    return p


def task_params(opts: argparse.Namespace) -> dict:
    """The options given, under the names ``run_task`` accepts; one the task does not take is refused by name."""
    spec = task_spec(opts.task)
    steps_name = "steps" if "steps" in spec.params else "num_inference_steps"
    given = {"seed": opts.seed, steps_name: opts.steps, "guidance_scale": opts.guidance_scale, "class": opts.grade}
    return request_params(spec, {k: v for k, v in given.items() if v is not None})


def main(argv: list[str]) -> int:
    opts, sdk_argv = split_argv(parser(), argv)
    if not opts.task:
        parser().error("--task is required (or set $BRATS_SYNTH_TASK)")
    spec = task_spec(opts.task)
    params = task_params(opts)
    given_input, given_output = peek_paths(sdk_argv)
    if spec.input != "none":
        resolve_nifti(given_input)
    check_output_dir(given_output)

    from tools.deploy.graphs import Application, ServeTaskApp

    context = Application.init_app_context(sdk_argv)  # the SDK's own -i/-o/-w resolution (and env variables)
    input_path = None if spec.input == "none" else resolve_nifti(context.input_path)
    out = check_output_dir(context.output_path, make=True)
    state = run_graph(ServeTaskApp, context, "deploy-", task=opts.task, params=params, input_path=input_path,
                      output=out, config=opts.config, device=opts.device)
    for name, path in state["written"].items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    main_guard(main)
