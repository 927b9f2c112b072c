"""``python -m tools impute``: the command-line face of ``common.cgan_imputation.impute.impute_dataset``."""

from __future__ import annotations

from common.errors import fail


def _flag(value) -> bool:
    """fire passes ``--flag false`` as the string "false"."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def impute(
    input: str,
    weights: str,
    source: str = "t2w",
    target: str = "t2f",
    output: str | None = None,
    batch: int = 16,
    device: str | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    bf16: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Impute a missing contrast with a pix2pix generator, slice by slice, on the source's voxel grid.

    Every case is checked first (sources present, target not already there); then each imputed volume is written
    atomically in BraTS naming (e.g. BraTS-GLI-00000-000-t2f.nii.gz) with the first source's affine and header,
    beside a JSON sidecar (same name, .json) marking it synthetic with the model, weights sha256, settings and seed.

    Args:
        input: a case folder, or a dataset folder (every case is imputed) in any BraTS or generic layout.
        weights: generator weights (``save_generator`` files, trainer checkpoints with a ``generator`` entry, or a
            bare ResnetGenerator state dict).
        source: acquired contrast(s) the model reads, comma-separated for several (t1n, t1c, t2w, t2f).
        target: the missing contrast to write.
        output: write into a copy of the dataset there (other files copied) instead of into the case folders.
        batch: axial slices per forward pass.
        device: cpu | cuda | cuda:N (default: cuda when available).
        overwrite: replace a target file that already exists (acquired or imputed); otherwise that is an error.
        skip_existing: leave cases whose target exists alone instead of stopping.
        bf16: run the generator under bfloat16 autocast.
        seed: recorded in the sidecar (the generator itself is deterministic).
        progress: progress bar over the cases.
    Returns:
        The written files.
    """
    import sys

    import torch

    from common.cgan_imputation.impute import impute_dataset
    from common.io import DataError

    try:
        records = impute_dataset(
            input, weights, source=source, target=target, output=output, batch=int(batch), device=device,
            overwrite=_flag(overwrite), skip_existing=_flag(skip_existing), seed=int(seed),
            amp_dtype=torch.bfloat16 if _flag(bf16) else None, progress=_flag(progress),
        )
    except DataError as err:
        fail(err)
    written = [r["output"] for r in records if not r.get("skipped")]
    skipped = len(records) - len(written)
    print(f"imputed {target} for {len(written)} case(s)" + (f", {skipped} skipped (target exists)" if skipped else ""),
          file=sys.stderr)
    return written
