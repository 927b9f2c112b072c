"""Timing helpers shared by the diffusion bundles' suites (LDM-3D, GliomaGen): one training variant of a real
trainer, and a sampler at several step counts with linear extrapolation on a CPU."""

from __future__ import annotations

import statistics
from typing import Callable

from common.benchmarks.runner import (SAMPLER_NAMES, BenchmarkContext, MemoryProbe, failed, iteration_times, quiet,
                                      release_memory, result, stats, time_calls)


def training_row(ctx: BenchmarkContext, group: str, name: str, build: Callable[[], tuple]) -> dict:
    """``build() -> (trainer, batch_size)``; runs warm-up + repeats iterations and times each (a variant that
    breaks -- out of memory, a non-finite loss -- is a row too)."""
    import torch

    ctx.log(f"{group}: {name}")
    mem = MemoryProbe(ctx.device)
    mem.start()
    torch.manual_seed(0)
    trainer = None
    try:
        trainer, batch_size = build()
        quiet(trainer)
        times = iteration_times(trainer, ctx.device)
        trainer.run()
        return result(group, name, times[ctx.warmup:], "s/iteration", mem, batch_size=batch_size,
                      final_loss=float(trainer.state.output["loss"]))
    except (FloatingPointError, RuntimeError) as exc:
        return failed(group, name, exc)
    finally:
        del trainer
        release_memory()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def sampling_rows(ctx: BenchmarkContext, network, condition, sampler_for: Callable) -> tuple[list[dict], bool]:
    """Seconds per sample of ``sampler_for(kind, steps)`` for every ``ctx.samplers`` entry, on ``condition``.

    On a CPU each sampler runs ``ctx.max_steps`` steps (and 1) and the per-sample time is extrapolated linearly in
    the step count; ``per_step_s`` and ``fixed_s`` (condition + decoder) come from the same two points."""
    import torch

    device = ctx.device
    results = []
    extrapolated_any = False
    sampler_for(ctx.samplers[0][0], min(2, ctx.samplers[0][1]))(condition, network)  # one-off costs first
    for kind, steps in ctx.samplers:
        measured = steps if ctx.max_steps is None else min(steps, ctx.max_steps)
        ctx.log(f"sampling: {kind} {steps} steps (timing {measured})")
        try:
            mem = MemoryProbe(device)
            mem.start()
            for _ in range(ctx.warmup):
                sampler_for(kind, min(2, steps))(condition, network)
            one = sampler_for(kind, 1)
            full = sampler_for(kind, measured)
            one(condition, network)  # always one untimed call: first-call costs must not bend the fit
            t_one = time_calls(lambda: one(condition, network), ctx.repeats, 0, device)
            t_k = time_calls(lambda: full(condition, network), ctx.repeats, 0, device)
            base = statistics.median(t_one)
            per_step = (statistics.median(t_k) - base) / (measured - 1) if measured > 1 else None
            extra = {"steps": steps, "measured_steps": measured, "per_step_s": per_step,
                     "fixed_s": base - per_step if per_step is not None else None, "one_step_call_s": stats(t_one)}
            if measured < steps:
                extrapolated_any = True
                times = [base + (t - base) * (steps - 1) / (measured - 1) for t in t_k]
                extra["extrapolated"] = True
            else:
                times = t_k
                extra["extrapolated"] = False
            results.append(result("per_sample", f"{SAMPLER_NAMES[kind]}-{steps}", times, "s/sample", mem, **extra))
        except RuntimeError as exc:  # out of memory at paper size is a result, not a crash
            results.append(failed("per_sample", f"{SAMPLER_NAMES[kind]}-{steps}", exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results, extrapolated_any


def extrapolation_note(ctx: BenchmarkContext) -> str:
    return (f"EXTRAPOLATED: each sampler ran {ctx.max_steps} steps (and 1 step); s/sample = t(1) + "
            "(t(k) - t(1)) * (N - 1) / (k - 1) for its N steps. Run with --max_steps 0 for full runs.")
