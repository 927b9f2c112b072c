"""``python -m tools demo``: the collection's main job on the embedded phantom data, end to end."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _step(title: str):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def demo(
    out: str = "demo_output",
    n: int = 4,
    seed: int = 0,
    phantom_shape: str = "240,240,155",
    workers: int = 2,
    spacing: float = 1.0,
    generate: bool = True,
):
    """Make phantom cases, preprocess them FeTS-style, write a datalist and QC pictures, then generate
    multi-contrast volumes from the phantom masks with the LDM-3D demo weights.

    Everything lands in `out`: raw/ (phantoms in the BraTS 2023 layout), preprocessed/ (atlas space, 1 mm,
    qc/*.png), datalist.json, ldm3d/generated/ (NIfTI per contrast + montage per sample) and overview.png.

    Args:
        out: output folder (created; reruns reuse finished steps).
        n: number of phantom cases.
        seed: phantom seed (same seed, same cases).
        phantom_shape: phantom grid "X,Y,Z" or "small" (the 240x240x155 mm field of view at this many voxels).
        workers: parallel processes for phantoms and preprocessing.
        spacing: preprocessing output voxel size in mm.
        generate: run the LDM-3D demo generation at the end.
    """
    from common.data.datalist import build_datalist
    from common.phantom import make_phantoms
    from common.preprocess.pipeline import PreprocessConfig
    from common.preprocess.runner import preprocess_dataset

    out_dir = Path(out)
    raw, pre = out_dir / "raw", out_dir / "preprocessed"
    from tools.phantoms import _parse_shape

    shape = _parse_shape(phantom_shape)
    started = time.perf_counter()

    t = _step(f"phantoms: {n} cases, grid {shape} -> {raw}")
    if not (raw / "grades.csv").exists():
        make_phantoms(raw, n=n, layout="brats2023", seed=seed, shape=shape, workers=workers)
    print(f"   {time.perf_counter() - t:.1f} s")

    t = _step(f"FeTS-style preprocessing -> {pre}")
    summary = preprocess_dataset(raw, pre, config=PreprocessConfig(spacing=float(spacing)), workers=workers)
    print(f"   processed {len(summary.processed)}, skipped (already done) {len(summary.skipped)}, "
          f"failed {len(summary.failed)}; {time.perf_counter() - t:.1f} s")
    if summary.failed:
        for case_id, error in summary.failed.items():
            print(f"   FAILED {error}", file=sys.stderr)
        sys.exit(1)

    t = _step("datalist with 2 folds")
    datalist = build_datalist(pre, out_dir / "datalist.json", folds=2, seed=seed, progress=False)
    print(f"   {out_dir / 'datalist.json'}: {len(datalist['training'])} training, "
          f"{len(datalist['validation'])} validation cases")

    generated = None
    pictures = []
    if generate:
        t = _step("LDM-3D: multi-contrast volumes from held-out phantom masks (committed demo weights)")
        from common.ldm3d.demo import ldm3d_demo

        generated = ldm3d_demo(out_dir / "ldm3d", n_masks=2, num_samples=2)
        print(f"   {len(generated)} samples in {out_dir / 'ldm3d' / 'generated'}; {time.perf_counter() - t:.1f} s")
        pictures = _method_demos(out_dir)

    overview = _overview(out_dir, generated)
    shown = ", ".join(str(p) for p in [overview, *pictures])
    print(f"\nDone in {time.perf_counter() - started:.0f} s. Look at {shown} and {pre / 'qc'}/*.png")


METHOD_DEMOS = [
    ("GliomaGen: augmented masks and the images generated from them", "common.gliomagen.demo:gliomagen_demo",
     "gliomagen"),
    ("VQGAN + masked transformer: generated LGG and HGG tumor regions beside real ones",
     "common.vqgan_transformer.demo:vqgan_demo", "vqgan_transformer"),
    ("cGAN imputation: a deleted FLAIR imputed from T2, beside the real one", "common.cgan_imputation.demo:cgan_demo",
     "cgan_imputation"),
]


def _method_demos(out_dir: Path) -> list[Path]:
    """Each other bundle's demo with its committed weights; each returns {"picture": path, ...}."""
    import importlib

    pictures = []
    for title, target, folder in METHOD_DEMOS:
        module, _, function = target.partition(":")
        try:
            run = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:  # a bundle whose demo runner is not there
            print(f"\n== {title}: skipped ({type(exc).__name__}: {exc})", flush=True)
            continue
        t = _step(title)
        result = run(out_dir / folder)
        pictures.append(Path(result["picture"]))
        print(f"   {pictures[-1]}; {time.perf_counter() - t:.1f} s")
    return pictures


def _overview(out_dir: Path, generated) -> Path:
    """The README picture: a preprocessed case with its mask, and the first generated sample with its mask."""
    from common import CONTRASTS
    from common.data.datalist import load_datalist
    from common.io import load_nifti
    from common.viz import save_montage, stack_pictures

    item = load_datalist(out_dir / "datalist.json", sections=("validation",))[0]
    save_montage({c: load_nifti(item[c])[0] for c in CONTRASTS}, out_dir / "preprocessed.png",
                 mask=load_nifti(item["label"])[0], title=f"{item['id']}: phantom after FeTS-style preprocessing")
    if not generated:
        return out_dir / "preprocessed.png"
    sample = generated[0]
    files = sample["files"]
    loaded = {c: load_nifti(files[c]) for c in CONTRASTS}
    save_montage({c: v[0] for c, v in loaded.items()}, out_dir / "generated.png", affine=loaded[CONTRASTS[0]][1],
                 mask=load_nifti(files["seg"])[0] if "seg" in files else None,
                 title=f"LDM-3D demo sample {sample['case']} (mask outlined)")
    return stack_pictures([out_dir / "preprocessed.png", out_dir / "generated.png"], out_dir / "overview.png")
