"""``make demo``'s cGAN step: a held-out phantom case loses its FLAIR, the bundle's committed T2 -> FLAIR demo
weights impute it (``inference.json`` + ``demo.json``, in the case folder), and one picture shows the T2 input,
the imputed FLAIR and the real one side by side."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

BUNDLE = "brats_mri_cgan_imputation"
DEMO_CONFIGS = ("inference.json", "task_t2w_to_t2f.json", "demo.json")
HELD_OUT_SEED = 1000  # the demo weights were trained on phantom seed 0


def _picture(source: np.ndarray, imputed: np.ndarray, real: np.ndarray, path: Path, title: str,
             lesion: np.ndarray | None = None) -> Path:
    """The axial slice with most tumour (most brain without a label) of the three volumes, one row, all in the
    [0, 1] units of the bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    where = lesion if lesion is not None and lesion.any() else real > 0
    z = int(np.argmax(where.sum(axis=(0, 1)))) if where.any() else real.shape[2] // 2
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    for ax, (name, vol) in zip(axes, (("T2 (input)", source), ("FLAIR imputed", imputed), ("FLAIR real", real))):
        ax.imshow(np.rot90(vol[:, :, z]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def cgan_demo(out_dir: str | os.PathLike, seed: int = HELD_OUT_SEED, progress: bool = True) -> dict:
    """Make one held-out phantom case in ``out_dir/case``, move its FLAIR to ``out_dir/real``, impute it with the
    committed demo weights and write ``out_dir/cgan_imputation.png``.

    Returns ``{"case", "imputed", "sidecar", "real", "picture", "ssim_brain", "ssim_input", "seconds"}`` (SSIMs:
    imputed vs real and T2 input vs real FLAIR, BraSyn scoring over the brain).
    """
    import time

    from common.bundle import bundle_config, run_bundle
    from common.cgan_imputation.data import apply_chain, volume_transforms
    from common.cgan_imputation.evaluate import score_scan
    from common.io import load_nifti
    from common.phantom import make_phantoms

    out = Path(out_dir)
    shape = bundle_config(BUNDLE, ["inference.json", "train.json", "demo.json"])["phantom_shape"]  # the weights' data
    case_dir = out / "case"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case = make_phantoms(case_dir, n=1, layout="brats2023", seed=int(seed), shape=tuple(shape), progress=progress)[0]
    case = Path(case)
    flair = case / f"{case.name}-t2f.nii.gz"
    real = out / "real" / flair.name
    real.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(flair), real)  # the "missing" contrast; kept aside to compare with
    start = time.perf_counter()
    record = run_bundle(BUNDLE, list(DEMO_CONFIGS), dataset_dir=str(case), in_place=True, progress=progress)[0][0]
    seconds = time.perf_counter() - start
    imputed = load_nifti(record["output"])[0]
    item = {"id": case.name, "t2w": str(case / f"{case.name}-t2w.nii.gz"), "t2f": str(real)}
    data = apply_chain(volume_transforms(("t2w",), "t2f"), item)  # the bundle's own scaling of input and target
    label = case / f"{case.name}-seg.nii.gz"
    scores = score_scan(imputed, data["target"][0].numpy(), data["source"][0].numpy(), label if label.exists() else None,
                        case=case.name)
    ssim, ssim_in = scores["predicted"]["ssim_brain"], scores["input"]["ssim_brain"]
    lesion = load_nifti(label)[0] > 0 if label.exists() else None
    picture = _picture(data["source"][0].numpy(), imputed, data["target"][0].numpy(), out / "cgan_imputation.png",
                       f"{case.name}: FLAIR imputed from T2 (demo weights) -- SSIM {ssim:.3f} vs T2 input {ssim_in:.3f}",
                       lesion)
    return {"case": str(case), "imputed": record["output"], "sidecar": record["sidecar"], "real": str(real),
            "picture": str(picture), "ssim_brain": ssim, "ssim_input": ssim_in, "seconds": round(seconds, 2)}
