"""Run a bundle's config in-process (what ``python -m monai.bundle run`` does), from any working directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def bundle_root(bundle: str | os.PathLike) -> Path:
    """A bundle folder, or the folder of that name under ``bundles/``."""
    root = Path(bundle) if Path(bundle).is_dir() else BUNDLES / str(bundle)
    if not (root / "configs").is_dir():
        from common.io import DataError

        raise DataError(root, "not a bundle folder (no configs/): give a bundle folder or a name under bundles/")
    return root.resolve()


def run_bundle(
    bundle: str | os.PathLike,
    config_files: Sequence[str],
    run_id: str = "run",
    **overrides: Any,
) -> Any:
    """``bundle``: a folder or a name under ``bundles/``; ``config_files`` relative to its ``configs/``.

    ``bundle_root`` is set to the bundle's absolute path, so the relative defaults of the configs (``models/``,
    ``runs/``, ``outputs/``) resolve the same as when the command runs from the bundle root.
    """
    from monai.bundle import ConfigWorkflow

    root = bundle_root(bundle)
    files = [str(root / "configs" / f) for f in config_files]
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type="infer" if run_id == "run" else "train",
        run_id=run_id,
        **{"bundle_root": str(root), **overrides},
    )
    workflow.initialize()
    try:
        return workflow.run()
    finally:
        workflow.finalize()
