"""What both deploy apps share: quiet executor logs, split our options from the SDK's, resolve the input, and end
with one clear line (exit 2) on a bad request instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

from common.io import DataError, open_nifti

SDK_OPTIONS = ("-i/--input PATH (else $HOLOSCAN_INPUT_PATH, else ./input), -o/--output DIR (else "
               "$HOLOSCAN_OUTPUT_PATH, else ./output), -w/--workdir DIR, -l/--log-level LEVEL: the MONAI Deploy "
               "SDK's own options")


def quiet_sdk() -> None:
    """Holoscan's C++ log is INFO-chatty and warns about CUDA on CPU machines; keep errors unless asked otherwise."""
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "ERROR")
    # the 8 MB default stack is enough for these linear graphs (see tools/deploy/README.md)
    warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning)


def split_argv(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and ``[argv0, *rest]`` for the SDK's ``init_app_context`` (which refuses options it lacks)."""
    ours, rest = parser.parse_known_args(argv[1:])
    return ours, [argv[0], *rest]


def resolve_nifti(path: str | os.PathLike) -> Path:
    """A NIfTI file, or the one NIfTI in a folder; checked readable before any work starts."""
    path = Path(path).resolve()
    if path.is_dir():
        found = sorted([*path.glob("*.nii.gz"), *path.glob("*.nii")])
        if not found:
            raise DataError(path, "no NIfTI file (.nii or .nii.gz) in this folder")
        if len(found) > 1:
            raise DataError(path, f"{len(found)} NIfTI files here ({', '.join(f.name for f in found[:4])}...); "
                                  "give one file with -i")
        path = found[0]
    elif not path.exists():
        raise DataError(path, "input does not exist")
    elif not path.name.endswith((".nii", ".nii.gz")):
        raise DataError(path, "not a NIfTI file (.nii or .nii.gz)")
    open_nifti(path)
    return path


def peek_paths(sdk_argv: list[str]) -> tuple[str, str]:
    """The input and output the SDK will resolve (``-i``/``-o``, else ``$HOLOSCAN_INPUT_PATH``/``OUTPUT_PATH``, else
    ``input``/``output``), read without importing it, so a bad request is refused before MONAI's slow import."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--input", "-i")
    peek.add_argument("--output", "-o")
    known, _ = peek.parse_known_args(sdk_argv[1:])
    return (known.input or os.environ.get("HOLOSCAN_INPUT_PATH") or "input",
            known.output or os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output")


def check_output_dir(path: str | os.PathLike, make: bool = False) -> Path:
    """The output folder, refused (no file in the way, writable) before the work; made when ``make``."""
    from common.io import check_output

    out = check_output(path, "dir", flag="output")
    if make:
        out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def main_guard(main: Callable[[list[str]], int]) -> None:
    """``sys.exit(main(sys.argv))`` with a request's fault printed as ``error: <file>: <problem>`` (exit 1, as
    every command of the project; argparse mistakes exit 2)."""
    try:
        code = main(sys.argv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def run_graph(app_class, context, prefix: str, **kwargs) -> dict:
    """Run one Holoscan app (``app_class(workdir=..., **kwargs)``) in a temporary work folder and return its
    state; an error an operator recorded is raised here, after the graph stopped."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix, dir=context.workdir or None) as work:
        app = app_class(workdir=Path(work), **kwargs)
        app.run()
    if "error" in app.state:
        raise app.state["error"]
    return app.state
