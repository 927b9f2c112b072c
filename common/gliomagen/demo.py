"""``make demo``'s GliomaGen step: held-out phantom masks -> augmented masks -> 4-contrast volumes from both, with
the committed demo weights (``bundles/brats_mri_gliomagen/models``) through the bundle's own configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BUNDLE = "brats_mri_gliomagen"
DEMO_CONFIGS = ("inference.json", "demo.json")
HELD_OUT_SEED = 1000  # the demo weights were trained on phantom seed 0


def gliomagen_demo(
    out_dir: str | os.PathLike,
    n_masks: int = 2,
    n_augment: int = 1,
    num_samples: int = 1,
    num_inference_steps: int = 50,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Make ``n_masks`` held-out BraTS-2024 phantom cases on the demo grid (``out_dir/reference``, 6-label masks),
    ``n_augment`` augmentations of each (``out_dir/augmented``), and generate from both (``out_dir/generated``,
    ``out_dir/generated_augmented``). Returns ``{"original": records, "augmented": records, "augment": summary}``."""
    from common.bundle import bundle_config, phantom_datalist, prepare_cases, run_bundle
    from common.gliomagen.masks import augment_masks

    out = Path(out_dir)
    for folder in ("generated", "generated_augmented"):  # the demo's own folders: a rerun starts them afresh
        shutil.rmtree(out / folder, ignore_errors=True)
    phantom_shape = bundle_config(BUNDLE, DEMO_CONFIGS)["phantom_shape"]  # the demo weights' data
    datalist = phantom_datalist(cache_dir, n=max(int(n_masks), 1), shape=phantom_shape, seed=HELD_OUT_SEED, folds=1,
                                layout="brats2024", progress=progress)
    prepare_cases(datalist, out / "reference", BUNDLE, DEMO_CONFIGS, section=("training", "validation"),
                  progress=progress)
    summary = augment_masks(out / "reference", out / "augmented", n=int(n_augment), seed=int(seed), progress=progress)
    settings = {"num_samples": int(num_samples), "num_inference_steps": int(num_inference_steps), "seed": int(seed)}
    original = run_bundle(BUNDLE, list(DEMO_CONFIGS), input=str(out / "reference"),
                          output_dir=str(out / "generated"), **settings)
    augmented = run_bundle(BUNDLE, list(DEMO_CONFIGS), input=str(out / "augmented"),
                           output_dir=str(out / "generated_augmented"), **settings)
    first = lambda result: result[0] if isinstance(result, list) and result and isinstance(result[0], list) else result  # noqa: E731
    original, augmented = first(original), first(augmented)
    return {"original": original, "augmented": augmented, "augment": summary,
            "picture": _picture(out, original, augmented)}


def _picture(out: Path, original: list[dict], augmented: list[dict]) -> Path:
    """One figure: a real mask beside its augmentation, then an image generated from each (montages)."""
    from common.viz import stack_pictures

    case = original[0]["source_id"]
    previews = sorted((out / "augmented" / "previews").glob(f"{case}*.png"))
    tail = "-".join(case.split("-")[-2:])  # augmented ids keep the case number (BraTS-GLIAUGAA-02006-100)
    from_aug = [r for r in augmented if r["source_id"].endswith(tail)] or augmented
    parts = [*previews[:1], original[0]["files"]["montage"], from_aug[0]["files"]["montage"]]
    return stack_pictures(parts, out / "gliomagen.png")
