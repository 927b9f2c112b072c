"""The benchmark runner (``python -m tools benchmark``): variants side by side, machine recorded.

House rule: speed and memory claims come from these benchmarks, run side by side with a reference in one
run, and are quoted with the machine they ran on. So every suite runs its variants one after the other in the
same process on the same inputs, the first variant of each group is the reference (``speedup`` = reference
median / variant median), and every report carries :func:`machine_info`.

A suite is a function ``suite(ctx: BenchmarkContext) -> {"results": [rows], "notes": [str], ...}`` registered by
dotted path in :data:`SUITES` (imported only when run, so a method module's suite never loads with another's).
Rows come from :func:`result` / :func:`skipped` / :func:`failed`. Method suites live beside their method
(``common/ldm3d/benchmark.py``...) and build their networks from the bundle's own configs.

What is measured:

* time: wall clock (``time.perf_counter``) around each call / iteration, with ``torch.cuda.synchronize``
  on CUDA; ``warmup`` calls first are excluded; median, min and max over ``repeats``.
* memory on CUDA: ``torch.cuda.max_memory_allocated`` during the variant (after a reset) minus what was
  allocated before its networks were built -- networks, optimizer state, activations (tensors only; the
  caching allocator may reserve more).
* memory on CPU: the rise of the process's peak resident set size (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each variant) above the resident size before its networks were built.
  Approximate: the C allocator may reuse memory freed by an earlier variant; where the peak cannot be reset,
  it is reported as unavailable.

Variants run in sequence (warm-up, repeats, next variant), so a change in background load between them
skews the comparison: the report holds the load average at the start and the end. A variant that breaks
(out of memory, non-finite loss) is recorded as ``failed`` with the reason and the run goes on.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from common.io import DataError

SUITES = {
    "phantoms": "common.benchmarks.data:phantoms",
    "preprocess": "common.benchmarks.data:preprocess",
    "loader": "common.benchmarks.data:loader",
    "engine": "common.benchmarks.engine:engine",
    "ldm3d_train": "common.ldm3d.benchmark:train",
    "ldm3d_sample": "common.ldm3d.benchmark:sample",
    "metrics": "common.benchmarks.metrics:metrics",
    "gliomagen_train": "common.gliomagen.benchmark:train",
    "gliomagen_sample": "common.gliomagen.benchmark:sample",
    "gliomagen_quality": "common.gliomagen.benchmark:quality",
    "gliomagen_masks": "common.gliomagen.benchmark:masks",
    "gliomagen_synthesis": "common.gliomagen.benchmark:synthesis",
    "vqgan_train": "common.vqgan_transformer.benchmark:train",
    "vqgan_sample": "common.vqgan_transformer.benchmark:sample",
    "cgan_train": "common.cgan_imputation.benchmark:train",
    "cgan_impute": "common.cgan_imputation.benchmark:impute",
}
"""Suite name -> ``module:function``. Add a line here to register a suite."""

SIZES = ("demo", "paper")
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "rflow": "RFlow"}
DEFAULT_SAMPLERS = "ddpm:1000,ddim:50,rflow:30"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(command: str | None = None) -> dict:
    """What a figure must be quoted with: CPU, cores, RAM, GPU, library versions, date and command line."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(shlex.quote(a) for a in sys.argv),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "ram_gib": _meminfo_gib(),
        "gpu": None,
        "gpu_memory_gib": None,
        "cuda": torch.version.cuda,
        "versions": {
            "torch": torch.__version__,
            **{name: _version(dist) for name, dist in (("monai", "monai"), ("numpy", "numpy"),
                               ("SimpleITK", "SimpleITK"), ("nilearn", "nilearn"), ("ignite", "pytorch-ignite"))},
        },
        "git_commit": _git_commit(),
        "load_average_1_5_15min": _loadavg(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# ------------------------------------------------------------------------------------------ measurement
def stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": [round(v, 6) for v in vals],
    }


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def children_peak_rss_mib() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        return None


def release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryProbe:
    """Peak memory of one variant (see the module docstring for what each device measures)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss_delta"
        self.base = 0
        self.available = True

    def start(self) -> None:
        import torch

        release_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memorystats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.available = False
        rss = _proc_status_kib("VmRSS")
        self.available = self.available and rss is not None
        self.base = (rss or 0) * 1024

    def peak_mib(self) -> float | None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return round((torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20, 1)
        hwm = _proc_status_kib("VmHWM")
        if not self.available or hwm is None:
            return None
        return round(max(hwm * 1024 - self.base, 0) / 2**20, 1)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device="cpu",
               after: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``after`` runs untimed after each."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if after is not None:
            after()
    return times


class BenchmarkContext:
    """Settings shared by the suites."""

    def __init__(self, size: str = "demo", device=None, repeats: int = 3, warmup: int = 1, workers: int | None = None,
                 samplers: str | Sequence = DEFAULT_SAMPLERS, max_steps: int | None = None,
                 overrides: dict | None = None, progress: bool = True, workdir: str | os.PathLike | None = None):
        import torch

        if size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {size!r}")
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if int(warmup) < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if device in (None, "", "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but torch sees no CUDA device")
        self.size = size
        self.repeats = int(repeats)
        self.warmup = int(warmup)
        self.workers = int(workers) if workers else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else (os.cpu_count() or 1))
        self.samplers = parse_samplers(samplers)
        if max_steps is None and self.device.type == "cpu":
            max_steps = 20  # on a CPU: time 20 steps and extrapolate (said in the report)
        self.max_steps = int(max_steps) if max_steps else None
        if self.max_steps is not None and self.max_steps < 2:
            raise ValueError(f"max_steps must be >= 2 (two points fix the per-step cost), got {max_steps}")
        self.overrides = dict(overrides or {})
        self.progress = progress
        self.workdir = workdir

    def log(self, message: str) -> None:
        """One line per variant on stderr, so a long run shows where it is."""
        if self.progress:
            print(f"[benchmark] {message}", file=sys.stderr, flush=True)

    def settings(self) -> dict:
        return {
            "size": self.size, "device": str(self.device), "repeats": self.repeats, "warmup": self.warmup,
            "workers": self.workers, "samplers": [f"{k}:{n}" for k, n in self.samplers], "max_steps": self.max_steps,
            "overrides": self.overrides,
        }


def parse_samplers(spec: str | Sequence) -> list[tuple[str, int]]:
    """``"ddpm:1000,ddim:50,rflow:30"`` -> [("ddpm", 1000), ("ddim", 50), ("rflow", 30)]."""
    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            name, _, steps = item.strip().partition(":")
        else:
            name, steps = item
        name = str(name).strip().lower()
        if name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {name!r} in {spec!r}; choose from {tuple(SAMPLER_NAMES)} as name:steps")
        try:
            n = int(steps)
        except (TypeError, ValueError):
            raise ValueError(f"sampler {name!r} needs a step count like {name}:50, got {item!r}") from None
        if n < 1:
            raise ValueError(f"sampler {name!r}: steps must be >= 1, got {n}")
        out.append((name, n))
    if not out:
        raise ValueError("no sampler given")
    return out


def result(group: str, variant: str, times: Sequence[float], unit: str, memory: MemoryProbe | None = None,
            **extra) -> dict:
    res = {"group": group, "variant": variant, "unit": unit, "seconds": stats(times)}
    if memory is not None:
        res["peak_memory_mib"] = memory.peak_mib()
        res["memory_measure"] = memory.kind
    res.update(extra)
    return res


def skipped(group: str, variant: str, why: str) -> dict:
    return {"group": group, "variant": variant, "skipped": why}


def failed(group: str, variant: str, exc: BaseException) -> dict:
    """A variant that broke (e.g. out of memory, non-finite loss) is a result too: recorded, not fatal."""
    import torch

    kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) else (
        "non-finite loss" if isinstance(exc, FloatingPointError) else type(exc).__name__)
    return {"group": group, "variant": variant, "failed": f"{kind}: {str(exc).splitlines()[0][:300]}"}


def iteration_times(trainer, device) -> list[float]:
    """Seconds of every iteration of an ignite engine (filled while it runs)."""
    from ignite.engine import Events

    times: list[float] = []
    start = [0.0]

    def started(_):
        sync(device)
        start[0] = time.perf_counter()

    def completed(_):
        sync(device)
        times.append(time.perf_counter() - start[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    return times


def quiet(trainer) -> None:
    import logging

    trainer.logger.setLevel(logging.WARNING)


def load_suite(name: str) -> Callable:
    module, _, function = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _parse_suites(suite: str | Iterable[str]) -> list[str]:
    items = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else [str(s) for s in suite]
    if "all" in items:
        return list(SUITES)
    bad = [s for s in items if s not in SUITES]
    if bad or not items:
        raise DataError("--suite", f"unknown suite(s) {bad}; choose from {', '.join(SUITES)} or all (comma-separated)")
    return list(dict.fromkeys(items))


def _add_speedups(results: list[dict]) -> None:
    """speedup = median of the group's reference (its first measured variant) / this variant's median;
    memory_vs_reference = this variant's peak memory / the reference's."""
    refs: dict[str, dict] = {}
    for r in results:
        if "skipped" in r or "failed" in r:
            continue
        ref = refs.setdefault(r["group"], r)
        r["reference"] = ref["variant"]
        r["speedup"] = ref["seconds"]["median"] / r["seconds"]["median"] if r["seconds"]["median"] > 0 else None
        m, m_ref = r.get("peak_memory_mib"), ref.get("peak_memory_mib")
        r["memory_vs_reference"] = m / m_ref if m is not None and m_ref else None


def run_benchmark(suite: str | Iterable[str] = "all", size: str = "demo", device=None, repeats: int = 3,
                  warmup: int = 1, workers: int | None = None, samplers: str | Sequence = DEFAULT_SAMPLERS,
                  max_steps: int | None = None, overrides: dict | None = None, command: str | None = None,
                  progress: bool = True, workdir=None) -> dict:
    """Run the chosen suites side by side in this process and return the report (machine info included).

    ``max_steps``: sampling suites time at most this many steps and extrapolate (None: full runs on CUDA,
    20 steps on a CPU; 0: always full). ``overrides``: settings each suite reads (bundle config ids for the
    method suites, e.g. ``unet_base_channels``; ``phantom_shape``, ``phantom_cases``... for the data suites);
    a suite refuses a key it does not know.
    """
    names = _parse_suites(suite)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of size settings, got {overrides!r}")
    ctx = BenchmarkContext(size, device, repeats, warmup, workers, samplers, max_steps, overrides, progress, workdir)
    report = {"machine": machine_info(command), "settings": ctx.settings(), "suites": {}}
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="benchmark", disable=not progress):
        t = time.perf_counter()
        out = load_suite(name)(ctx)
        _add_speedups(out["results"])
        out["suite_seconds"] = round(time.perf_counter() - t, 2)
        report["suites"][name] = out
    report["machine"]["load_average_at_end"] = _loadavg()  # other work on the machine skews timings: check it
    return report


# ----------------------------------------------------------------------------------------------- output
def _fmt_s(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.01:
        return f"{v:.3f}"
    return f"{v * 1000:.2f} ms"


def to_markdown(report: dict) -> str:
    """A Markdown page: machine first, then one table per suite with the reference of each group."""
    m = report["machine"]
    v = m.get("versions", {})
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB)" if m.get("gpu") else "none"
    lines = [
        "# Benchmark",
        "",
        f"- machine: {m['cpu']}, {m['cpu_cores']} cores ({m.get('cpu_cores_usable')} usable, torch threads "
        f"{m.get('torch_threads')}), {m['ram_gib']} GiB RAM; GPU: {gpu}",
        f"- software: Python {m['python']}, torch {v.get('torch')}, MONAI {v.get('monai')}, numpy {v.get('numpy')}, "
        f"SimpleITK {v.get('SimpleITK')}; {m['platform']}; commit {m.get('git_commit')}",
        f"- date: {m['date_utc']}; command: `{m['command']}`",
        f"- load average (1/5/15 min) at start {m.get('load_average_1_5_15min')}, at end "
        f"{m.get('load_average_at_end')}: a load above the core count means other work shared the machine",
        f"- settings: size {report['settings']['size']}, device {report['settings']['device']}, repeats "
        f"{report['settings']['repeats']} (median [min-max]), warm-up {report['settings']['warmup']} excluded",
        "",
    ]
    for name, suite in report["suites"].items():
        lines += [f"## {name}", "",
                  "| group | variant | median | min | max | unit | speedup vs reference | peak memory (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in suite["results"]:
            if "skipped" in r or "failed" in r:
                why = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['failed']}"
                lines.append(f"| {r['group']} | {r['variant']} | {why} | | | | | |")
                continue
            sec = r["seconds"]
            speed = "reference" if r.get("reference") == r["variant"] else (
                f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
            name_col = r["variant"] + (" (extrapolated)" if r.get("extrapolated") else "")
            memv, ratio = r.get("peak_memory_mib"), r.get("memory_vs_reference")
            mem_col = "-" if memv is None else f"{memv}" + (
                f" ({ratio:.2f}x)" if ratio is not None and r.get("reference") != r["variant"] else "")
            lines.append(f"| {r['group']} | {name_col} | {_fmt_s(sec['median'])} | {_fmt_s(sec['min'])} | "
                         f"{_fmt_s(sec['max'])} | {r['unit']} | {speed} | {mem_col} |")
        steps = [r for r in suite["results"] if "per_step_median_s" in r]
        if steps:
            keys = list(steps[0]["per_step_median_s"])
            lines += ["", "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for r in steps:
                cells = " | ".join(_fmt_s(r["per_step_median_s"][k]) for k in keys)
                lines.append(f"| {r['variant']} | {cells} |")
        samp = [r for r in suite["results"] if "per_step_s" in r]
        if samp:
            lines += ["", "| variant | steps | measured steps | s/step | fixed s (conditioner + decoder) |",
                      "|---|---|---|---|---|"]
            for r in samp:
                lines.append(f"| {r['variant']} | {r['steps']} | {r['measured_steps']} | {_fmt_s(r['per_step_s'])} | "
                             f"{_fmt_s(r['fixed_s'])} |")
        memkind = {r.get("memory_measure") for r in suite["results"] if r.get("memory_measure")}
        lines += [""] + [f"- {n}" for n in suite.get("notes", [])]
        if memkind:
            lines.append(f"- memory: {', '.join(sorted(memkind))} (see common/benchmarks/runner.py)")
        lines.append("")
    return "\n".join(lines)


def save_report(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write the JSON report and the Markdown table beside it (``bench.json`` -> ``bench.md``), atomically."""
    from common.io import atomic_path, save_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(report, out)
    md = out.with_suffix(".md")
    with atomic_path(md) as tmp:
        Path(tmp).write_text(to_markdown(report))
    return out, md
