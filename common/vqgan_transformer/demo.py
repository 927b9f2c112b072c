"""``make demo``'s VQGAN + masked transformer step: LGG and HGG tumour ROIs generated with the committed demo
weights (``bundles/brats_mri_vqgan_transformer/models``) through the bundle's own configs, drawn beside real
(held-out phantom) ROIs of the same classes, with the ROI workflow and the importance score maps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BUNDLE = "brats_mri_vqgan_transformer"
DEMO_CONFIGS = ("inference.json", "demo.json")
HELD_OUT_SEED = 1000  # the demo weights were trained on phantom seed 0


def vqgan_demo(out_dir: str | os.PathLike, count: int = 3, n_real: int = 6, seed: int = 0,
               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Generate ``count`` LGG and ``count`` HGG ROIs (``out_dir/generated``: NIfTI, montage, manifest) and draw
    them beside the ROIs of ``n_real`` held-out phantom cases (``out_dir/real_vs_generated.png``); also the
    workflow of one real case (``roi_workflow.png``) and the stage-1 importance maps (``importance.png``).

    Returns ``{"picture", "workflow", "importance", "generated", "classes", "real_counts"}``.
    """
    from common.bundle import bundle_config, phantom_datalist, run_bundle
    from common.data.datalist import load_datalist
    from common.vqgan_transformer.bundle import load_generated, real_rois
    from common.vqgan_transformer.networks import CLASSES
    from common.vqgan_transformer.sampling import save_real_vs_generated
    from common.vqgan_transformer.transforms import save_importance_maps, save_roi_workflow

    import numpy as np
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "generated", ignore_errors=True)  # the demo's own folder: a rerun starts it afresh
    parser = bundle_config(BUNDLE, DEMO_CONFIGS)
    datalist = phantom_datalist(cache_dir, n=max(int(n_real), 2), shape=parser["phantom_shape"], seed=HELD_OUT_SEED,
                                folds=1, progress=progress)
    rois, labels = real_rois(datalist, parser.get_parsed_content("preprocessing"), progress=progress)
    run_bundle(BUNDLE, list(DEMO_CONFIGS), **{"class": "both", "count": int(count), "seed": int(seed),
                                              "output_dir": str(out / "generated")})
    generated, requested = load_generated(out / "generated")
    real = {c: [r for r, y in zip(rois, labels) if y == i] for i, c in enumerate(CLASSES)}
    synthetic = {c: [r for r, y in zip(generated, requested) if y == i] for i, c in enumerate(CLASSES)}
    per_class = max(1, min(int(count), 3))
    picture = save_real_vs_generated(real, synthetic, out / "real_vs_generated.png", per_class=per_class,
                                     title="FLAIR tumour ROIs: real (held-out phantoms) vs generated (demo model)")
    items = [it for s in ("training", "validation") for it in load_datalist(datalist, s)]
    workflow = save_roi_workflow(items[0], out / "roi_workflow.png", roi_size=parser["roi_size"],
                                 contrast=parser["contrast"])
    picks = [next(i for i, y in enumerate(labels) if y == c) for c in range(len(CLASSES)) if c in labels]
    vqgan = parser.get_parsed_content("vqgan")
    importance = save_importance_maps(vqgan, torch.as_tensor(np.stack([rois[i] for i in picks])),
                                      [CLASSES[labels[i]] for i in picks], out / "importance.png")
    return {"picture": Path(picture), "workflow": Path(workflow), "importance": Path(importance),
            "generated": out / "generated", "classes": [CLASSES[c] for c in requested],
            "real_counts": {c: len(v) for c, v in real.items()}}
