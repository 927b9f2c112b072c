"""``python -m tools <command>``: one fire entry point for every project command.

Each command lives in ``tools/<command>.py`` as a function of the same name (hyphens become underscores); it is imported only when
it is asked for, so ``python -m tools --help`` stays fast and one command's heavy imports never slow another.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "phantoms": "Write N physics-based brain-tumor phantom cases in a BraTS layout.",
    "datalist": "Detect a dataset's layout, validate every case and write a datalist with folds.",
    "preprocess": "FeTS-style preprocessing: reorient, N4, co-register, skull-strip, crop, resample, normalise.",
    "evaluate": "Evaluate synthetic against real images (FID/KID, MS-SSIM, SSIM/PSNR/MAE, ...).",
    "demo": "The main job on embedded data: phantoms -> preprocessing -> datalist -> QC -> LDM-3D generation.",
    "benchmark": "Time and measure memory of the pipeline's steps side by side (phantoms, preprocessing, LDM-3D training and sampling).",
    "package": "Write a bundle's reproducible model-zoo release zip (NAME/ at its top, large files hash-checked); print its sha1.",
    "augment-masks": "N plausible new tumor masks per real mask (flips, affine, elastic, translation, resizing), each validity-checked.",
    "synthesize": "Generate a synthetic BraTS-layout dataset from a mask folder: resumable, sharded, with a manifest and quality scores.",
    "export-nnunet": "Export real/synthetic datasets as nnU-Net v2 raw datasets (imagesTr, labelsTr, dataset.json) for the paper's training sets.",
    "score-segmentation": "Score predicted segmentations against references: kappa, accuracy, F1 per label, Dice, volume r, HD95, ASSD.",
    "impute": "Impute a missing contrast (e.g. t2w -> t2f) with a pix2pix generator, on the source's grid, with a synthetic sidecar.",
    "tune": "Bayesian hyper-parameter search (Optuna TPE, resumable SQLite study, pruning) -> best-parameter config overlay and plots.",
}


def _load(name: str):
    """``augment-masks`` lives in ``tools/augment_masks.py`` as ``augment_masks``."""
    module = name.replace("-", "_")
    return getattr(importlib.import_module(f"tools.{module}"), module)


TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def typed_flags(fn):
    """``fn`` with its boolean flags read the way people write them: fire passes ``--n4 false`` as the string
    "false", which is truthy; here true/false/yes/no/on/off/1/0 in any case become booleans and anything else is
    refused naming the flag."""
    import functools
    import inspect

    from common.io import DataError

    signature = inspect.signature(fn)
    flags = {n for n, p in signature.parameters.items() if p.annotation in (bool, "bool") or isinstance(p.default, bool)}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        for name in flags & set(bound.arguments):
            value = bound.arguments[name]
            if isinstance(value, (bool, int)) and value in (0, 1):
                bound.arguments[name] = bool(value)
            elif isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
                bound.arguments[name] = value.strip().lower() in TRUE
            else:
                raise DataError(f"--{name}", f"expects true or false (yes/no, 1/0), got {value!r}")
        return fn(*bound.args, **bound.kwargs)

    return wrapper


def main(argv: list[str] | None = None) -> None:
    import fire

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print("usage: python -m tools <command> [--flags]   (python -m tools <command> --help for details)\n")
        for name, summary in COMMANDS.items():
            print(f"  {name:<{width}}  {summary}")
        return
    name = argv[0]
    if name not in COMMANDS:
        sys.exit(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    fire.Fire(typed_flags(_load(name)), command=argv[1:], name=f"python -m tools {name}")


if __name__ == "__main__":
    main()
