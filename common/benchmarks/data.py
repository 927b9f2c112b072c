"""Data suites: phantom generation and FeTS-style preprocessing (CPU)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from common.benchmarks.runner import (BenchmarkContext, MemoryProbe, children_peak_rss_mib, result, stats,
                                      time_calls)


def phantoms(ctx: BenchmarkContext) -> dict:
    """Seconds per phantom case: in memory, written with 1 worker and with N workers."""
    from common.phantom import DEFAULT_SHAPE, SMALL_SHAPE, generate_case, make_phantoms
    from common.phantom import anatomy

    shape = tuple(ctx.overrides.get("phantom_shape", DEFAULT_SHAPE if ctx.size == "paper" else SMALL_SHAPE))
    parallel_cases = int(ctx.overrides.get("phantom_cases", ctx.workers))
    serial_cases = int(ctx.overrides.get("phantom_serial_cases", min(2, parallel_cases)))
    anatomy.templates()  # template loading is a one-off per process: not part of a case's cost
    results = []
    ctx.log(f"phantoms: generate_case {shape}")
    mem = MemoryProbe("cpu")
    mem.start()
    seeds = iter(range(10_000))
    times = time_calls(lambda: generate_case(next(seeds), shape=shape), ctx.repeats, ctx.warmup)
    results.append(result("in_memory", "generate_case", times, "s/case", mem, cases_per_call=1))
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        runs = [(1, serial_cases)] + ([(ctx.workers, parallel_cases)] if ctx.workers > 1 else [])
        for workers, n in runs:
            folder = Path(tmp) / f"workers{workers}"

            def run(workers=workers, n=n, folder=folder):
                make_phantoms(folder, n=n, shape=shape, workers=workers, progress=False)

            def remove(folder=folder):  # untimed; full-size cases take ~0.2 GB each
                shutil.rmtree(folder, ignore_errors=True)

            ctx.log(f"phantoms: make_phantoms workers={workers}, {n} cases")
            mem = MemoryProbe("cpu")
            mem.start()
            times = time_calls(run, ctx.repeats, ctx.warmup, after=remove)
            res = result("written", f"make_phantoms workers={min(workers, n)} ({n} cases)", [t / n for t in times],
                          "s/case", mem, cases_per_call=n, workers=min(workers, n), wall_seconds=stats(times))
            if min(workers, n) > 1:  # the work happens in child processes: the parent's RSS says nothing
                res["peak_memory_mib"] = None
                res["worker_peak_rss_mib"] = children_peak_rss_mib()
            results.append(res)
    notes = [f"phantom shape {'x'.join(map(str, shape))}; s/case = wall time of one call / cases it wrote "
             "(NIfTI writing included for make_phantoms); memory = CPU peak RSS rise of this process; with several "
             "workers it is not measured in the table: worker_peak_rss_mib in the JSON is the largest worker's "
             "peak RSS (getrusage RUSAGE_CHILDREN)"]
    return {"results": results, "notes": notes}


def preprocess(ctx: BenchmarkContext) -> dict:
    """``preprocess_case`` on one phantom case, total and per step, for the 1 mm recipe and a 2 mm one."""
    from common.phantom import DEFAULT_SHAPE, SMALL_SHAPE, generate_case
    from common.preprocess import PreprocessConfig, load_atlas, preprocess_case

    shape = tuple(ctx.overrides.get("phantom_shape", DEFAULT_SHAPE if ctx.size == "paper" else SMALL_SHAPE))
    case = generate_case(7, shape=shape)
    images = {name: (array, case.affine) for name, array in case.images.items()}
    label = (case.label, case.affine)
    variants = ctx.overrides.get("preprocess_variants") or [
        ("default (1 mm)", {}),
        ("2 mm", {"spacing": 2.0}),
    ]
    atlas = load_atlas()
    results = []
    for name, kwargs in variants:
        config = PreprocessConfig(**kwargs)
        records: list[dict] = []

        def run(config=config):
            records.append(preprocess_case(images, label, config=config, atlas=atlas, case_id="benchmark").record)

        ctx.log(f"preprocess: {name}")
        mem = MemoryProbe("cpu")
        mem.start()
        times = time_calls(run, ctx.repeats, ctx.warmup)
        timed = records[ctx.warmup:]
        steps = [k for k in timed[0]["timings_s"] if k != "total"]
        per_step = {k: statistics.median(r["timings_s"][k] for r in timed) for k in steps}
        results.append(result("per_case", name, times, "s/case", mem, per_step_median_s=per_step,
                               config=config.to_dict(), output_shape=timed[0]["output_shape"]))
    notes = [f"one phantom case of {'x'.join(map(str, shape))} voxels with label; atlas loaded once outside the "
             "timing; per-step seconds from PreprocessResult.record['timings_s'] (median over repeats)"]
    rows, note = _n4_anisotropic(ctx, case)
    return {"results": results + rows, "notes": notes + [note]}


def _n4_anisotropic(ctx: BenchmarkContext, case) -> tuple[list, str]:
    """N4 on the case and on a thick-slice copy of it (every k-th axial slice, ~7 mm): shrink by the largest
    spacing (the former rule: full in-plane resolution on thick slices) against per-axis shrink factors."""
    import math

    import numpy as np
    import SimpleITK as sitk

    from common.preprocess import core

    array = np.asarray(case.images["t1n"], dtype=np.float32)
    spacing = np.sqrt((np.asarray(case.affine)[:3, :3] ** 2).sum(0))
    k = max(2, int(round(7.0 / float(spacing[2]))))
    thick = array[:, :, ::k]
    affine = np.asarray(case.affine, dtype=float).copy()
    affine[:3, 2] *= k
    rows = []
    inputs = {"as generated": (array, case.affine), f"1 axial slice in {k}": (thick, affine)}
    for label, (data, aff) in inputs.items():
        image = core.to_sitk(np.maximum(data, 0.0), aff)
        mask = core.foreground_mask(image)
        sp = "x".join(f"{v:.1f}" for v in image.GetSpacing())
        group = f"N4, t1n {label} ({sp} mm, {'x'.join(map(str, image.GetSize()))})"
        old = max(1, int(math.ceil(4.0 / max(image.GetSpacing()) - 1e-6)))
        repeats, warmup = (1, 0) if ctx.size == "paper" else (ctx.repeats, ctx.warmup)
        for variant, shrink in ((f"shrink {old} on every axis (largest spacing, former)", old),
                                ("per-axis shrink " + "x".join(map(str, core.n4_shrink_factor(image, 4.0))),
                                 core.n4_shrink_factor(image, 4.0))):
            ctx.log(f"preprocess: {group}: {variant}")
            mem = MemoryProbe("cpu")
            mem.start()
            times = time_calls(lambda shrink=shrink: core.n4_bias_correct(image, mask, shrink), repeats, warmup)
            rows.append(result(group, variant, times, "s/volume", mem))
    note = (f"N4 rows: core.n4_bias_correct on the phantom's t1n and on a copy keeping 1 axial slice in {k}; "
            "the former rule shrank every axis by 4 mm / the largest spacing, so thick slices ran N4 at full "
            "in-plane resolution; the per-axis rule shrinks each axis towards 4 mm (at least 16 voxels left)")
    return rows, note


LOADER_BUNDLES = [  # (name, bundle, training configs): the bundles whose augmentations DALI runs
    ("GliomaGen", "brats_mri_gliomagen", ["inference.json", "train.json"]),
    ("LDM-3D autoencoder", "brats_mri_ldm3d", ["inference.json", "train_autoencoder.json"]),
]


def loader(ctx: BenchmarkContext) -> dict:
    """Seconds per training sample of each bundle's own loader: MONAI with 0 and N workers against DALI (on the
    benchmark device), one epoch per call after the caches were filled (CacheDataset at construction, DALI's
    array cache on first use)."""
    from common.bundle import bundle_config

    cases = int(ctx.overrides.get("phantom_cases", 8))
    results, notes = [], []
    monai_variants = [("MONAI, 0 workers", {"loader": "monai", "num_workers": 0})]
    if ctx.workers > 1:
        monai_variants.append((f"MONAI, {ctx.workers} workers", {"loader": "monai", "num_workers": ctx.workers}))
    dali_variant = (f"DALI ({ctx.device.type})", {"loader": "dali"})
    # every forking (worker) variant before the first DALI pipeline: a process forked while DALI's threads run
    # can deadlock
    runs = [(b, v) for b in LOADER_BUNDLES for v in monai_variants] + [(b, dali_variant) for b in LOADER_BUNDLES]
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        for (name, bundle, files), (variant, extra) in runs:
            configs = files + (["demo.json"] if ctx.size == "demo" else [])
            base = {"cache_dir": str(Path(tmp) / "cache"), "phantom_cases": cases,
                    "device": f"$torch.device('{ctx.device}')",
                    **{k: v for k, v in ctx.overrides.items() if k not in ("phantom_cases",)}}
            ctx.log(f"loader: {name}: {variant}")
            try:
                train_loader = bundle_config(bundle, configs, **base, **extra).get_parsed_content("train#loader")
                n = len(train_loader.sampler)

                def epoch(train_loader=train_loader):
                    for batch in train_loader:
                        batch["image"].sum().item()  # the batch is really there (device sync)

                times = [t / n for t in time_calls(epoch, ctx.repeats, ctx.warmup, ctx.device)]
                results.append(result(name, variant, times, "s/sample", samples_per_epoch=n,
                                      samples_per_second=round(1 / stats(times)["median"], 1)))
            except Exception as exc:  # e.g. DALI absent: recorded, the suite goes on
                from common.benchmarks.runner import failed

                results.append(failed(name, variant, exc))
    order = {name: i for i, (name, _, _) in enumerate(LOADER_BUNDLES)}
    results.sort(key=lambda r: order[r["group"]])  # grouped by bundle for the table (stable: variant order kept)
    notes.append(f"{cases} phantom cases per bundle ({ctx.size} configs), the training split (3/4 of them); "
                 "the bundle's own chain and augmentations; compare samples/s with the bundle's *_train suite "
                 "(samples per training step / seconds per step) to see whether the loader keeps up")
    return {"results": results, "notes": notes}
