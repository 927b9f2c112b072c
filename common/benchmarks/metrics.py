"""Metrics suite: MONAI's dense SSIM window against the separable kernel of ``common.ops``, then a whole
evaluation (``evaluate_sets``, ``--extractor none``) of N real against N synthetic cases with 1 and N workers,
extrapolated to 500 against 500.

Registered as ``"metrics": "common.benchmarks.metrics:metrics"`` in ``common.benchmarks.runner.SUITES``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from common.benchmarks.runner import BenchmarkContext, MemoryProbe, failed, result, stats, time_calls

KERNEL_SHAPES = {"demo": [(128, 128, 64), (240, 240, 155)], "paper": [(128, 128, 64), (240, 240, 155)]}
MS_WEIGHTS_3 = (0.0448, 0.2856, 0.3001)  # 3 scales (renormalised): 128x128x64 is too small for the standard 5


def _pair(shape, device):
    """A 4-contrast volume pair in [0, 1]: smooth structure plus noise (SSIM values in a realistic range)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = F.avg_pool3d(torch.rand(1, 4, *shape, generator=gen), 5, stride=1, padding=2)
    x = (x - x.amin()) / (x.amax() - x.amin())
    y = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x.to(device), y.to(device)


def _side_by_side(ctx: BenchmarkContext, group: str, variants, repeats: int, warmup: int) -> list:
    """Time each (name, fn) on the same inputs; the last row gets the largest difference of the values."""
    import torch

    rows, values = [], {}
    for name, fn in variants:
        ctx.log(f"metrics: {group}: {name}")
        try:
            mem = MemoryProbe(ctx.device)
            mem.start()
            with torch.no_grad():
                times = time_calls(lambda fn=fn: values.__setitem__(name, fn()), repeats, warmup, ctx.device)
            rows.append(result(group, name, times, "s/pair", mem, value=float(values[name].mean())))
        except Exception as exc:  # out of memory on a small machine: recorded, the run goes on
            rows.append(failed(group, name, exc))
    if len(values) == 2:
        a, b = values.values()
        rows[-1]["max_abs_difference"] = float((a.double() - b.double()).abs().max())
    return rows


def _kernels(ctx: BenchmarkContext) -> tuple[list, list]:
    import torch
    from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

    from common.ops import ms_ssim, ssim

    w = torch.tensor(MS_WEIGHTS_3)
    weights = tuple((w / w.sum()).tolist())
    results, notes = [], []
    shapes = [tuple(s) for s in ctx.overrides.get("metric_kernel_shapes", KERNEL_SHAPES[ctx.size])]
    for shape in shapes:
        x, y = _pair(shape, ctx.device)
        big = shape[0] * shape[1] * shape[2] > 2_000_000
        repeats, warmup = (1, 0) if big and ctx.device.type == "cpu" else (ctx.repeats, ctx.warmup)
        tag = "x".join(map(str, shape))
        results += _side_by_side(ctx, f"SSIM, 4 contrasts {tag}", [
            ("MONAI compute_ssim_and_cs (dense 11^3 window)",
             lambda: compute_ssim_and_cs(x, y, 3, (11,) * 3, (1.5,) * 3)[0].flatten(1).mean(1)),
            ("common.ops.ssim (separable)", lambda: ssim(x, y, reduction="none")),
        ], repeats, warmup)
        results += _side_by_side(ctx, f"MS-SSIM (3 scales), 4 contrasts {tag}", [
            ("MONAI compute_ms_ssim (dense 11^3 window)",
             lambda: compute_ms_ssim(x, y, 3, kernel_size=11, weights=weights).flatten()),
            ("common.ops.ms_ssim (separable)", lambda: ms_ssim(x, y, weights=weights, reduction="none")),
        ], repeats, warmup)
        del x, y
    notes.append("kernel rows: one pair of 4-contrast volumes [1, 4, *shape] per call, values in [0, 1]; MONAI's "
                 "float32 11^3 window sums to 1 - 1.4e-7, which moves its MS-SSIM by up to ~3e-5 at coarse "
                 "scales (max_abs_difference); at 240x240x155 on a CPU each variant runs once, no warm-up")
    return results, notes


def _write_sets(root: Path, n: int, shape, workers: int) -> tuple[list, list]:
    """n phantom cases (real) and a noised copy of each (synthetic, paired by id), written as NIfTI."""
    import numpy as np

    from common import CONTRASTS
    from common.io import load_nifti, save_nifti
    from common.metrics import load_items
    from common.phantom import make_phantoms

    make_phantoms(root / "real", n=n, shape=shape, workers=workers, progress=False)
    real = load_items(root / "real")
    rng = np.random.default_rng(0)
    synth = []
    for it in real:
        item = {"id": it["id"]}
        for c in CONTRASTS:
            data, affine, _ = load_nifti(it[c])
            noisy = np.clip(data + rng.normal(0, 0.05 * float(data.max()), data.shape) * (data > 0), 0, None)
            path = root / "synthetic" / str(it["id"]) / f"{c}.nii.gz"
            save_nifti(noisy.astype(np.float32), affine, path)
            item[c] = str(path)
        synth.append(item)
    return real, synth


def _end_to_end(ctx: BenchmarkContext) -> tuple[list, list]:
    from common.metrics import EvalConfig, evaluate_sets

    shape = tuple(ctx.overrides.get("metric_case_shape", (128, 128, 64)))
    # 40: with 2 workers the pool's start-up (spawn + imports, ~15 s here) swamps the slope at 10 vs 20 cases
    n_big = int(ctx.overrides.get("metric_cases", 40))
    n_small = max(2, n_big // 2)
    target = int(ctx.overrides.get("metric_extrapolate_to", 500))
    results, extrapolated = [], []
    worker_counts = [1] + ([ctx.workers] if ctx.workers > 1 else [])
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        ctx.log(f"metrics: writing {n_big} phantom cases of {shape} and noised copies")
        real, synth = _write_sets(Path(tmp), n_big, shape, ctx.workers)
        group = f"evaluate {n_big} vs {n_big} cases {'x'.join(map(str, shape))}, extractor none"
        for workers in worker_counts:
            per_n = {}
            for n in (n_small, n_big):
                config = EvalConfig(extractor=None, workers=workers, n_montages=0, progress=False, curves=False,
                                    device=str(ctx.device), feature_cache=None)
                out = Path(tmp) / f"out-{workers}-{n}"

                def run(n=n, config=config, out=out):
                    evaluate_sets(real[:n], synth[:n], out, config)

                ctx.log(f"metrics: {group}: workers={workers}, {n} cases")
                mem = MemoryProbe("cpu")
                mem.start()
                per_n[n] = (time_calls(run, 1, 0, ctx.device), mem)
                shutil.rmtree(out, ignore_errors=True)
            t_small = stats(per_n[n_small][0])["median"]
            t_big = stats(per_n[n_big][0])["median"]
            per_case = (t_big - t_small) / (n_big - n_small)  # start-up (worker spawn, imports) cancels out
            fixed = max(0.0, t_big - per_case * n_big)
            row = result(group, f"workers={workers}", per_n[n_big][0], "s/run", per_n[n_big][1],
                         workers=workers, seconds_per_case_pair=round(per_case, 3), fixed_seconds=round(fixed, 1),
                         **{f"seconds_{n_small}_cases": round(t_small, 2),
                            f"extrapolated_{target}_vs_{target}_minutes": round((fixed + per_case * target) / 60, 1)})
            if workers > 1:
                row["peak_memory_mib"] = None  # the work happens in the workers
            results.append(row)
            if per_case > 0:
                extrapolated.append(f"workers={workers}: {per_case:.2f} s per case pair + {fixed:.0f} s start-up -> "
                                    f"{target} vs {target} in {(fixed + per_case * target) / 60:.1f} min")
            else:  # timing noise larger than the work added: no honest slope
                extrapolated.append(f"workers={workers}: {n_big} cases took no longer than {n_small} "
                                    f"({t_big:.1f} s vs {t_small:.1f} s): start-up dominates, no extrapolation; "
                                    "rerun with a larger metric_cases")
    notes = [f"end to end: evaluate_sets on {n_big} phantom cases ({'x'.join(map(str, shape))}, 4 contrasts) against "
             "noised copies paired by id (paired SSIM/PSNR/MAE brain+lesion, MS-SSIM fidelity, MMD, histograms), "
             f"NIfTI reading included, extractor none; timed at {n_small} and {n_big} cases: the slope is the cost "
             f"of one real + one synthetic case, the intercept start-up; extrapolated to {target} vs {target} "
             "as intercept + slope x N", "extrapolated: " + "; ".join(extrapolated)]
    return results, notes


def metrics(ctx: BenchmarkContext) -> dict:
    """SSIM/MS-SSIM kernels side by side, then whole evaluations with 1 and N workers.

    Overrides: metric_kernel_shapes, metric_case_shape, metric_cases, metric_extrapolate_to, metric_skip_end_to_end.
    """
    results, notes = _kernels(ctx)
    if not ctx.overrides.get("metric_skip_end_to_end"):
        r, n = _end_to_end(ctx)
        results += r
        notes += n
    return {"results": results, "notes": notes}
