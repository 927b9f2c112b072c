"""``python -m tools synthesize``: a synthetic BraTS-layout dataset from a folder of masks (resumable, sharded)."""

from __future__ import annotations

from common.errors import fail


def load_generator(spec: str):
    """``"package.module:function"`` -> the ``generate_case(case, seed)`` callable that ``function()`` returns."""
    import importlib

    from common.io import DataError

    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise DataError("--generator", f"{spec!r} is not of the form package.module:function")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DataError("--generator", f"cannot import {spec!r} ({type(exc).__name__}: {exc})") from exc
    generate_case = factory()
    if not callable(generate_case):
        raise DataError("--generator", f"{spec}() returned {type(generate_case).__name__}, not a generate_case callable")
    return generate_case


def synthesize(
    masks: str,
    out: str,
    generator: str,
    shard: str = "0/1",
    seed: int = 0,
    label_scheme: str = "brats2024",
    layout: str = "brats2024",
    progress: bool = True,
) -> str:
    """Generate one case folder (4 contrasts + ``-seg``) per mask, on the mask's grid, with a manifest.

    Killed at any moment and started again, it skips the finished cases and redoes the unfinished one; several
    workers (``--shard i/n``, and torchrun ranks inside each) split the masks deterministically, and every case's
    seed depends only on ``--seed`` and its id, so any split writes the same files. ``manifest.json`` in ``--out``
    lists every case with its seed, files and quality score (``common.generation.synthesis``: use
    ``select_high_quality`` for the high-quality subset).

    Args:
        masks: a mask NIfTI, a folder of masks (e.g. from ``augment-masks``, or a dataset: its ``-seg`` files)
            or a datalist JSON.
        out: output dataset folder (BraTS layout; created).
        generator: ``package.module:function``; ``function()`` returns ``generate_case(case, seed) ->
            {contrast: array}`` (a bundle's model wraps into one; tests use a fake).
        shard: ``i/n``: this worker's share of the masks.
        seed: base seed (per case: derived from it and the case id).
        label_scheme: scheme of the input masks (brats2024, brats2023, six_label, ...).
        layout: output layout (brats2024: ``-seg`` written with BraTS 2024 labels; head dropped).
        progress: progress bar with rate and ETA.
    Returns:
        The manifest path.
    """
    import json
    import sys

    from common.generation.sources import collect_masks
    from common.generation.synthesis import BratsCaseWriter, synthesize_dataset
    from common.io import DataError

    try:
        cases = [{"id": case_id, "label": str(path)} for case_id, path in collect_masks(masks)]
        summary = synthesize_dataset(
            cases, load_generator(generator), out, writer=BratsCaseWriter(layout), shard=str(shard), seed=seed,
            label_scheme=label_scheme, progress=progress,
        )
    except DataError as err:
        fail(err)
    print(json.dumps(summary), file=sys.stderr)
    return summary["manifest"]
