"""GliomaGen benchmark suites: mask augmentation per draw, and mass synthesis in 1 vs N processes.

The synthesis suite measures the *pipeline's* scaling (sharding, writing, manifest), so it runs a stand-in
``generate_case`` of a fixed cost: a small 3-D conv net applied ``standin_steps`` times per case, like a
denoising loop. The real network's cost per sample is the sampling suite's business.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common.benchmarks.runner import BenchmarkContext, result

DEMO_GRID = (64, 64, 40)
PAPER_GRID = (240, 240, 155)


def synthetic_mask(shape=DEMO_GRID) -> np.ndarray:
    """A head ellipsoid with a nested tumor (SNFH > ET > NETC) and a resection cavity, in 6 labels."""
    from common.gliomagen.masks import ET, HEAD, NETC, RC, SNFH

    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")

    def ball(c, r):
        return sum(((g[i] - c[i]) / r[i]) ** 2 for i in range(3)) <= 1

    m = np.zeros(shape, np.uint8)
    m[ball((0, 0, 0), (0.75, 0.8, 0.8))] = HEAD
    c = (0.2, 0.05, 0.05)
    for label, r in ((SNFH, 0.25), (ET, 0.16), (NETC, 0.08)):
        m[ball(c, (r, r, r * 1.4))] = label
    m[ball((0.05, 0.05, 0.2), (0.05, 0.05, 0.07))] = RC
    return m


def standin_generator():
    """``generate_case`` of a fixed cost: a 3-layer conv net run ``$GLIOMAGEN_STANDIN_STEPS`` times (default 10)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(10, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv3d(16, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv3d(16, 4, 3, padding=1)).eval()
    steps = int(os.environ.get("GLIOMAGEN_STANDIN_STEPS", "10"))

    @torch.no_grad()
    def generate_case(case, seed):
        g = torch.Generator().manual_seed(seed)
        m = torch.as_tensor(np.asarray(case["mask"]), dtype=torch.long).clamp(max=5)
        cond = torch.nn.functional.one_hot(m, 6).permute(3, 0, 1, 2).float()[None]
        x = torch.randn((1, 4, *m.shape), generator=g)
        for _ in range(steps):
            x = x - 0.05 * net(torch.cat([x, cond], 1))
        return {c: x[0, i].numpy() for i, c in enumerate(("t1n", "t1c", "t2w", "t2f"))}

    return generate_case


def _shard_worker(args) -> tuple[float, float, int, float]:
    """One worker process: run its shard; returns (start, end, cases, CPU seconds) (wall clock for start/end)."""
    cases, out, shard, steps = args
    import torch

    torch.set_num_threads(1)
    os.environ["GLIOMAGEN_STANDIN_STEPS"] = str(steps)
    from common.generation.synthesis import synthesize_dataset

    generate = standin_generator()
    start, cpu = time.time(), time.process_time()
    summary = synthesize_dataset(cases, generate, out, shard=shard, progress=False, distributed=False)
    return start, time.time(), summary["generated"], time.process_time() - cpu


def synthesis(ctx: BenchmarkContext) -> dict:
    """Cases per second of ``synthesize_dataset`` with 1 process and with ``ctx.workers`` shard processes."""
    import multiprocessing as mp

    from common.io import save_nifti

    shape = tuple(ctx.overrides.get("synthesis_shape", PAPER_GRID if ctx.size == "paper" else DEMO_GRID))
    steps = int(ctx.overrides.get("standin_steps", 10))
    workers = max(2, ctx.workers) if ctx.workers > 1 else 2
    n = int(ctx.overrides.get("synthesis_cases", 2 * workers))
    results = []
    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        mask = synthetic_mask(shape)
        cases = [{"id": f"BraTS-GLI-{k:05d}-100", "label": str(save_nifti(mask, np.eye(4), Path(tmp) / f"m{k}.nii.gz",
                                                                           dtype=np.uint8)),
                  "scheme": "six_label"} for k in range(n)]
        ctx_spawn = mp.get_context("spawn")  # fresh interpreters: no threads inherited from this process
        rates = {}
        for count in (1, workers):
            ctx.log(f"gliomagen_synthesis: {n} cases, {count} process(es)")
            out = Path(tmp) / f"out{count}"
            with ctx_spawn.Pool(count) as pool:
                spans = pool.map(_shard_worker, [(cases, str(out), f"{i}/{count}", steps) for i in range(count)])
            wall = max(sp[1] for sp in spans) - min(sp[0] for sp in spans)
            rates[count] = n / wall
            results.append(result("throughput", f"{count} process(es)", [wall / n], "s/case", None, processes=count,
                                   cases=n, wall_seconds=wall, cases_per_second=n / wall,
                                   cpu_seconds_per_case=sum(sp[3] for sp in spans) / n,
                                   speedup=(n / wall) / rates[1] if count > 1 else 1.0))
    notes = [f"stand-in generator: 3-layer conv net x {steps} steps per case on {'x'.join(map(str, shape))}, one "
             "thread per process; wall time from the first worker's start to the last one's end (imports "
             "excluded); linear scaling = speedup equal to the process count on an otherwise idle machine; "
             "cpu_seconds_per_case (all workers' CPU time / cases) stays the same when sharding adds no overhead, "
             "also on a busy machine"]
    return {"results": results, "notes": notes}


def masks(ctx: BenchmarkContext) -> dict:
    """Seconds per mask augmentation draw (flip/affine/elastic, tumor move and resize, cleaning, validity check)."""
    from common.benchmarks.runner import time_calls
    from common.gliomagen.masks import augment_mask

    shape = tuple(ctx.overrides.get("mask_shape", PAPER_GRID if ctx.size == "paper" else DEMO_GRID))
    mask = synthetic_mask(shape)
    seeds = iter(range(10_000))
    stats = {}

    def draw():
        _, s = augment_mask(mask, n=1, seed=next(seeds), case_id="bench")
        stats.setdefault("tries", []).append(s["tries"])

    ctx.log(f"gliomagen_masks: augment_mask on {'x'.join(map(str, shape))}")
    times = time_calls(draw, ctx.repeats, ctx.warmup)
    tries = stats["tries"][ctx.warmup:]
    per_try = [t / k for t, k in zip(times, tries)]
    return {"results": [result("augmentation", "augment_mask n=1", times, "s/mask", None, tries=tries),
                        result("augmentation", "one draw", per_try, "s/draw", None)],
            "notes": [f"synthetic 6-label mask {'x'.join(map(str, shape))}; a mask may need several draws "
                      "(rejected ones are redrawn): s/mask includes them, s/draw divides by their number"]}
