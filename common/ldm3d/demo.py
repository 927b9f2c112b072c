"""``make demo``'s last step for LDM-3D: held-out phantom masks -> multi-contrast volumes with the committed demo
weights (``bundles/brats_mri_ldm3d/models``), through the bundle's own ``inference.json`` + ``demo.json``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

DEMO_CONFIGS = ("inference.json", "demo.json")
HELD_OUT_SEED = 1000  # the demo weights were trained on phantom seed 0


def ldm3d_demo(
    out_dir: str | os.PathLike,
    n_masks: int = 2,
    num_samples: int = 2,
    num_inference_steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Make ``n_masks`` held-out phantom cases, bring them to the demo grid (``out_dir/reference``) and generate
    ``num_samples`` 4-contrast volumes per mask into ``out_dir/generated``; returns the generation records."""
    from common.bundle import bundle_config, phantom_datalist, prepare_cases, run_bundle

    out = Path(out_dir)
    shutil.rmtree(out / "generated", ignore_errors=True)  # the demo's own folder: a rerun starts it afresh
    phantom_shape = bundle_config("brats_mri_ldm3d", DEMO_CONFIGS)["phantom_shape"]  # the demo weights' data
    datalist = phantom_datalist(cache_dir, n=max(int(n_masks), 1), shape=phantom_shape, seed=HELD_OUT_SEED,
                                folds=1, progress=progress) if n_masks >= 1 else None
    prepare_cases(datalist, out / "reference", "brats_mri_ldm3d", DEMO_CONFIGS, section=("training", "validation"),
                  progress=progress)
    result = run_bundle(
        "brats_mri_ldm3d",
        list(DEMO_CONFIGS),
        input=str(out / "reference"),
        output_dir=str(out / "generated"),
        num_samples=int(num_samples),
        num_inference_steps=int(num_inference_steps),
        sampler=sampler,
        seed=int(seed),
    )
    return result[0] if isinstance(result, list) and result else result
