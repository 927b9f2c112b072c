"""Side-by-side speed and memory measurements of the pipeline's steps (``python -m tools benchmark``).

House rule: speed and memory claims come from these benchmarks, run side by side with a reference in one
run, and are quoted with the machine they ran on. So every suite runs its variants one after the other in the
same process on the same inputs, the first variant of each group is the reference (``speedup`` = reference
median / variant median), and every report carries :func:`machine_info`.

Suites (``SUITES``):

* ``phantoms`` -- seconds per phantom case: ``generate_case`` in memory, ``make_phantoms`` with 1 worker and
  with N workers (wall time / cases; the NIfTI writing included).
* ``preprocess`` -- ``preprocess_case`` on one phantom case, total and per step (``record["timings_s"]``),
  for the default 1 mm recipe and a 2 mm one.
* ``ldm3d_train`` -- seconds per training iteration of the real ``AutoencoderTrainer`` (with its patch
  discriminator active) and ``DiffusionTrainer`` (mask-conditioned LDM), fp32 vs bf16 autocast, and for the
  autoencoder with / without gradient checkpointing; fp16 variants only on CUDA.
* ``ldm3d_sample`` -- seconds per sample of ``MaskConditionedSampler`` for DDPM / DDIM / rectified flow at
  their step counts (default DDPM-1000, DDIM-50, RFlow-30).

Sizes: ``paper`` = the bundle's main configs (``bundles/brats_mri_ldm3d/configs/train_*.json``), ``demo`` =
those overlaid with ``demo.json`` (values are read from the bundle, so the benchmark follows its configs).
Networks have random weights and inputs are random tensors: speed and memory do not depend on the values.

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
* sampling: on CUDA every sampler runs its full step count by default; on a CPU each runs 20 steps (and 1)
  and the per-sample time is extrapolated linearly in the step count (marked ``extrapolated`` and in the
  notes); ``per_step_s`` and ``fixed_s`` (conditioner + decoder) come from the same two points.

Variants run in sequence (warm-up, repeats, next variant), so a change in background load between them
skews the comparison: the report holds the load average at the start and the end. A variant that breaks
(out of memory, non-finite loss) is recorded as ``failed`` with the reason and the run goes on.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "SUITES",
    "SIZES",
    "BenchmarkContext",
    "machine_info",
    "ldm3d_sizes",
    "parse_samplers",
    "run_benchmark",
    "to_markdown",
    "save_report",
]

_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "rflow": "RFlow"}
SUITES = ("phantoms", "preprocess", "ldm3d_train", "ldm3d_sample")
SIZES = ("demo", "paper")
DEFAULT_SAMPLERS = "ddpm:1000,ddim:50,rflow:30"
BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "brats_mri_ldm3d" / "configs"

# used when the bundle is not beside this package (values of its main configs / demo.json at writing time)
_LDM3D_PAPER = {
    "contrasts": ["t1n", "t1c", "t2w", "t2f"], "spatial_size": [128, 128, 64], "latent_channels": 8,
    "ae_channels": [64, 128, 256], "ae_num_res_blocks": 2, "ae_norm_groups": 32, "discriminator_channels": 32,
    "discriminator_layers": 3,
    "batch_size": 2, "kl_weight": 1e-7, "ssim_weight": 0.1, "adversarial_weight": 0.01,
    "unet_base_channels": 256, "unet_channel_mult": [1, 1, 2], "unet_attention_levels": [False, True, True],
    "unet_num_res_blocks": 2, "unet_num_head_channels": 32, "unet_norm_groups": 32, "cross_attention_dim": 256,
    "conditioner_channels": [32, 64], "condition_channels": 8, "token_grid": [8, 8, 4], "condition_labels": [1, 2, 3],
    "diffusion_batch_size": 2, "num_train_timesteps": 1000, "beta_schedule": "scaled_linear_beta",
    "beta_start": 0.0015, "beta_end": 0.0195, "condition_dropout": 0.1,
}
_LDM3D_DEMO = {
    "spatial_size": [64, 64, 32], "ae_channels": [8, 16, 16], "ae_num_res_blocks": 1, "ae_norm_groups": 4,
    "discriminator_channels": 16, "batch_size": 2, "unet_base_channels": 16, "unet_channel_mult": [1, 2, 2],
    "unet_num_res_blocks": 1, "unet_num_head_channels": 8, "unet_norm_groups": 8, "cross_attention_dim": 32,
    "conditioner_channels": [16, 32], "token_grid": [4, 4, 2], "diffusion_batch_size": 4,
    "unet_attention_levels": [False, False, True], "ssim_weight": 0.0,
}


# ----------------------------------------------------------------------------------------------- machine
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
def _stats(values: Sequence[float]) -> dict:
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


def _children_peak_rss_mib() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        return None


def _release_cpu_memory() -> None:
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

        _release_cpu_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
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


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device="cpu",
               after: Callable[[], Any] | None = None) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; ``after`` runs untimed after each."""
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
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
    from common.networks.sampling import SAMPLERS

    items = [s for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, str):
            name, _, steps = item.strip().partition(":")
        else:
            name, steps = item
        name = str(name).strip().lower()
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} in {spec!r}; choose from {SAMPLERS} as name:steps")
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


def _result(group: str, variant: str, times: Sequence[float], unit: str, memory: MemoryProbe | None = None,
            **extra) -> dict:
    res = {"group": group, "variant": variant, "unit": unit, "seconds": _stats(times)}
    if memory is not None:
        res["peak_memory_mib"] = memory.peak_mib()
        res["memory_measure"] = memory.kind
    res.update(extra)
    return res


def _skipped(group: str, variant: str, why: str) -> dict:
    return {"group": group, "variant": variant, "skipped": why}


# --------------------------------------------------------------------------------------------- phantoms
def bench_phantoms(ctx: BenchmarkContext) -> dict:
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
    results.append(_result("in_memory", "generate_case", times, "s/case", mem, cases_per_call=1))
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
            res = _result("written", f"make_phantoms workers={min(workers, n)} ({n} cases)", [t / n for t in times],
                          "s/case", mem, cases_per_call=n, workers=min(workers, n), wall_seconds=_stats(times))
            if min(workers, n) > 1:  # the work happens in child processes: the parent's RSS says nothing
                res["peak_memory_mib"] = None
                res["worker_peak_rss_mib"] = _children_peak_rss_mib()
            results.append(res)
    notes = [f"phantom shape {'x'.join(map(str, shape))}; s/case = wall time of one call / cases it wrote "
             "(NIfTI writing included for make_phantoms); memory = CPU peak RSS rise of this process; with several "
             "workers it is not measured in the table: worker_peak_rss_mib in the JSON is the largest worker's "
             "peak RSS (getrusage RUSAGE_CHILDREN)"]
    return {"results": results, "notes": notes}


# ------------------------------------------------------------------------------------------- preprocess
def bench_preprocess(ctx: BenchmarkContext) -> dict:
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
        results.append(_result("per_case", name, times, "s/case", mem, per_step_median_s=per_step,
                               config=config.to_dict(), output_shape=timed[0]["output_shape"]))
    notes = [f"one phantom case of {'x'.join(map(str, shape))} voxels with label; atlas loaded once outside the "
             "timing; per-step seconds from PreprocessResult.record['timings_s'] (median over repeats)"]
    return {"results": results, "notes": notes}


# ------------------------------------------------------------------------------------------------ LDM-3D
def _plain_values(path: Path) -> dict:
    """Literal values of a bundle config (expressions and references are skipped)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items()
            if "#" not in k and not (isinstance(v, str) and v[:1] in ("$", "@", "%")) and not isinstance(v, dict)}


def ldm3d_sizes(size: str = "demo", overrides: dict | None = None, configs: Path = BUNDLE_CONFIGS) -> dict:
    """Network and batch sizes of the LDM-3D bundle: its main configs (``paper``), plus demo.json (``demo``)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    sizes = dict(_LDM3D_PAPER)
    found = configs.is_dir()
    if found:
        for name in ("train_autoencoder.json", "train_diffusion.json"):
            sizes.update({k: v for k, v in _plain_values(configs / name).items() if k in _LDM3D_PAPER})
    if size == "demo":
        sizes.update(_LDM3D_DEMO)
        if found:
            sizes.update({k: v for k, v in _plain_values(configs / "demo.json").items() if k in _LDM3D_PAPER})
    sizes.update({k: v for k, v in (overrides or {}).items() if k in _LDM3D_PAPER})
    sizes["source"] = str(configs) if found else "built-in copy of the bundle's sizes"
    return sizes


def _build_autoencoder(s: dict, checkpointing: bool = False):
    from common.networks import build_autoencoder

    return build_autoencoder(in_channels=len(s["contrasts"]), latent_channels=s["latent_channels"],
                             channels=s["ae_channels"], num_res_blocks=s["ae_num_res_blocks"],
                             norm_num_groups=s["ae_norm_groups"], use_checkpoint=checkpointing)


def _build_ldm(s: dict, autoencoder):
    from common.networks import build_ldm

    return build_ldm(
        autoencoder, latent_channels=s["latent_channels"], labels=s["condition_labels"],
        base_channels=s["unet_base_channels"], channel_mult=s["unet_channel_mult"],
        attention_levels=s["unet_attention_levels"], num_res_blocks=s["unet_num_res_blocks"],
        num_head_channels=s["unet_num_head_channels"], cross_attention_dim=s["cross_attention_dim"],
        norm_num_groups=s["unet_norm_groups"], conditioner_channels=s["conditioner_channels"],
        condition_channels=s["condition_channels"], token_grid=s["token_grid"],
    )


def _random_mask(batch: int, spatial: Sequence[int], labels: Sequence[int], device, seed: int = 0):
    """A blob of tumour labels in the middle of the volume (values do not change speed, only shapes do)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros((batch, 1, *spatial))
    centre = [s // 2 for s in spatial]
    sl = tuple(slice(c - max(1, s // 6), c + max(1, s // 6)) for c, s in zip(centre, spatial))
    region = mask[(slice(None), slice(None), *sl)]
    region.copy_(torch.tensor(list(labels), dtype=torch.float32)[torch.randint(len(labels), region.shape, generator=g)])
    return mask.to(device)


def _batches(s: dict, batch_size: int, n: int, device) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    image = torch.randn((batch_size, len(s["contrasts"]), *s["spatial_size"]), generator=g).to(device)
    label = _random_mask(batch_size, s["spatial_size"], s["condition_labels"], device)
    return [{"image": image, "label": label} for _ in range(n)]


def _iteration_times(trainer, device) -> list[float]:
    from ignite.engine import Events

    times: list[float] = []
    start = [0.0]

    def started(_):
        _sync(device)
        start[0] = time.perf_counter()

    def completed(_):
        _sync(device)
        times.append(time.perf_counter() - start[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, completed)
    return times


def _quiet(trainer) -> None:
    import logging

    trainer.logger.setLevel(logging.WARNING)


def _failed(group: str, variant: str, exc: BaseException) -> dict:
    """A variant that broke (e.g. out of memory, non-finite loss) is a result too: recorded, not fatal."""
    import torch

    kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc) else (
        "non-finite loss" if isinstance(exc, FloatingPointError) else type(exc).__name__)
    return {"group": group, "variant": variant, "failed": f"{kind}: {str(exc).splitlines()[0][:300]}"}


def _train_variant(ctx: BenchmarkContext, s: dict, group: str, name: str, amp: str | None,
                   checkpointing: bool = False) -> dict:
    """Build the networks and the real trainer for one variant, run warm-up + repeats iterations, time each."""
    import torch
    from monai.networks.nets import PatchDiscriminator
    from monai.networks.schedulers import DDPMScheduler

    from common.engines import AutoencoderTrainer, DiffusionTrainer

    device = ctx.device
    n_iter = ctx.warmup + ctx.repeats
    ctx.log(f"ldm3d_train: {group} {name}")
    mem = MemoryProbe(device)
    mem.start()
    torch.manual_seed(0)
    trainer = None
    try:
        if group == "autoencoder":
            batch_size = s["batch_size"]
            ae = _build_autoencoder(s, checkpointing=checkpointing).to(device)
            disc = PatchDiscriminator(spatial_dims=3, num_layers_d=s["discriminator_layers"],
                                      channels=s["discriminator_channels"], in_channels=len(s["contrasts"]),
                                      out_channels=1, norm="INSTANCE").to(device)
            trainer = AutoencoderTrainer(
                device=device, max_epochs=1, train_data_loader=_batches(s, batch_size, n_iter, device),
                autoencoder=ae, optimizer=torch.optim.Adam(ae.parameters(), lr=1e-4),
                discriminator=disc, d_optimizer=torch.optim.Adam(disc.parameters(), lr=5e-4),
                kl_weight=s["kl_weight"], ssim_weight=s["ssim_weight"], adversarial_weight=s["adversarial_weight"],
                adversarial_warmup_iterations=0, amp=amp,
            )
        else:
            batch_size = s["diffusion_batch_size"]
            ae = _build_autoencoder(s).to(device).eval()
            network = _build_ldm(s, ae).to(device)
            scheduler = DDPMScheduler(s["num_train_timesteps"], s["beta_schedule"], beta_start=s["beta_start"],
                                      beta_end=s["beta_end"], clip_sample=False)
            trainer = DiffusionTrainer(
                device=device, max_epochs=1, train_data_loader=_batches(s, batch_size, n_iter, device),
                network=network, optimizer=torch.optim.Adam(network.trainable_parameters(), lr=2.5e-5),
                scheduler=scheduler, autoencoder=ae, condition_key="label",
                condition_dropout=s["condition_dropout"], amp=amp,
            )
        _quiet(trainer)
        times = _iteration_times(trainer, device)
        trainer.run()
        return _result(group, name, times[ctx.warmup:], "s/iteration", mem, batch_size=batch_size,
                       final_loss=float(trainer.state.output["loss"]))
    except (FloatingPointError, RuntimeError) as exc:
        return _failed(group, name, exc)
    finally:
        del trainer
        _release_cpu_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_ldm3d_train(ctx: BenchmarkContext) -> dict:
    s = ldm3d_sizes(ctx.size, ctx.overrides)
    on_cuda = ctx.device.type == "cuda"
    variants = [
        ("autoencoder", "fp32", None, False), ("autoencoder", "bf16 autocast", "bf16", False),
        ("autoencoder", "fp32 + checkpointing", None, True),
        ("autoencoder", "bf16 autocast + checkpointing", "bf16", True),
        ("autoencoder", "fp16 autocast + GradScaler", "fp16", False),
        ("diffusion", "fp32", None, False), ("diffusion", "bf16 autocast", "bf16", False),
        ("diffusion", "fp16 autocast + GradScaler", "fp16", False),
    ]
    results = []
    # one untimed iteration per group first, so one-off process costs (kernel/primitive caches, allocator
    # arenas, lazy initialisation) are not charged to whichever variant happens to run first
    primer = copy.copy(ctx)
    primer.repeats, primer.warmup, primer.progress = 1, 0, False
    for group in ("autoencoder", "diffusion"):
        _train_variant(primer, s, group, "primer", None)
    for group, name, amp, ckpt in variants:
        if amp == "fp16" and not on_cuda:
            results.append(_skipped(group, name, "needs CUDA"))
        else:
            results.append(_train_variant(ctx, s, group, name, amp, ckpt))

    notes = [
        f"sizes from {s['source']} ({ctx.size}): input {len(s['contrasts'])}x{'x'.join(map(str, s['spatial_size']))}, "
        f"AE channels {s['ae_channels']}, UNet base {s['unet_base_channels']} x {s['unet_channel_mult']}",
        "autoencoder iteration = generator step (L1 + KL + SSIM + adversarial; perceptual off: no local weights) "
        "+ patch-discriminator step; diffusion iteration = frozen-AE encode + conditioned UNet step (LDM)",
        "checkpointing = MONAI AutoencoderKL use_checkpoint (activation recomputation in the backward pass)",
    ]
    return {"results": results, "notes": notes, "sizes": s}


def bench_ldm3d_sample(ctx: BenchmarkContext) -> dict:
    import torch

    from common.networks import MaskConditionedSampler, make_sampling_scheduler

    s = ldm3d_sizes(ctx.size, ctx.overrides)
    device = ctx.device
    mem = MemoryProbe(device)
    mem.start()
    torch.manual_seed(0)
    network = _build_ldm(s, _build_autoencoder(s)).to(device).eval()
    network.scale_factor.fill_(1.0)  # random weights: any positive scale
    mask = _random_mask(1, s["spatial_size"], s["condition_labels"], device)
    guidance = float(ctx.overrides.get("guidance_scale", 1.0))
    model_mib = mem.peak_mib()

    def sampler_for(kind: str, steps: int):
        if kind == "ddpm":  # MONAI's DDPM runs every training step: a k-step schedule costs what k of 1000 cost
            sched = make_sampling_scheduler("ddpm", steps, s["beta_schedule"], s["beta_start"], s["beta_end"])
        else:
            sched = make_sampling_scheduler(kind, s["num_train_timesteps"], s["beta_schedule"], s["beta_start"],
                                            s["beta_end"])
        return MaskConditionedSampler(sched, num_inference_steps=steps, guidance_scale=guidance, num_samples=1,
                                      progress=False)

    results = []
    extrapolated_any = False
    sampler_for(ctx.samplers[0][0], min(2, ctx.samplers[0][1]))(mask, network)  # one-off costs: see ldm3d_train
    for kind, steps in ctx.samplers:
        measured = steps if ctx.max_steps is None else min(steps, ctx.max_steps)
        ctx.log(f"ldm3d_sample: {kind} {steps} steps (timing {measured})")
        try:
            mem = MemoryProbe(device)
            mem.start()
            for _ in range(ctx.warmup):
                sampler_for(kind, min(2, steps))(mask, network)
            one = sampler_for(kind, 1)
            full = sampler_for(kind, measured)
            one(mask, network)  # always one untimed call: first-call costs must not land in t(1) and bend the fit
            t_one = time_calls(lambda: one(mask, network), ctx.repeats, 0, device)
            t_k = time_calls(lambda: full(mask, network), ctx.repeats, 0, device)
            base = statistics.median(t_one)
            per_step = (statistics.median(t_k) - base) / (measured - 1) if measured > 1 else None
            extra = {
                "steps": steps, "measured_steps": measured, "per_step_s": per_step,
                "fixed_s": base - per_step if per_step is not None else None,
                "one_step_call_s": _stats(t_one),
            }
            if measured < steps:
                extrapolated_any = True
                times = [base + (t - base) * (steps - 1) / (measured - 1) for t in t_k]
                extra["extrapolated"] = True
            else:
                times = t_k
                extra["extrapolated"] = False
            results.append(_result("per_sample", f"{_SAMPLER_NAMES[kind]}-{steps}", times, "s/sample", mem, **extra))
        except RuntimeError as exc:  # out of memory at paper size is a result, not a crash
            results.append(_failed("per_sample", f"{_SAMPLER_NAMES[kind]}-{steps}", exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    notes = [
        f"sizes from {s['source']} ({ctx.size}): image {len(s['contrasts'])}x{'x'.join(map(str, s['spatial_size']))}, "
        f"UNet base {s['unet_base_channels']} x {s['unet_channel_mult']}; one mask, one sample per call, "
        f"guidance scale {guidance}; the call includes the conditioner, the denoising loop and the decoder",
        f"networks ~{model_mib} MiB before sampling; peak memory per variant is on top of them",
    ]
    if extrapolated_any:
        notes.append(
            f"EXTRAPOLATED: each sampler ran {ctx.max_steps} steps (and 1 step); s/sample = t(1) + "
            "(t(k) - t(1)) * (N - 1) / (k - 1) for its N steps. Run with --max_steps 0 for full runs."
        )
    return {"results": results, "notes": notes, "sizes": s, "network_memory_mib": model_mib}


SUITE_FUNCTIONS = {
    "phantoms": bench_phantoms,
    "preprocess": bench_preprocess,
    "ldm3d_train": bench_ldm3d_train,
    "ldm3d_sample": bench_ldm3d_sample,
}


def _parse_suites(suite: str | Iterable[str]) -> list[str]:
    items = [s.strip() for s in suite.split(",")] if isinstance(suite, str) else [str(s) for s in suite]
    if "all" in items:
        return list(SUITES)
    bad = [s for s in items if s not in SUITES]
    if bad or not items:
        raise ValueError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)} or all (comma-separated)")
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
    20 steps on a CPU; 0: always full). ``overrides``: size keys of :func:`ldm3d_sizes` plus
    ``phantom_shape``, ``phantom_cases``, ``phantom_serial_cases``, ``preprocess_variants``, ``guidance_scale``.
    """
    names = _parse_suites(suite)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of size settings, got {overrides!r}")
    known = set(_LDM3D_PAPER) | {"phantom_shape", "phantom_cases", "phantom_serial_cases", "preprocess_variants",
                                 "guidance_scale"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; known: {', '.join(sorted(known))}")
    ctx = BenchmarkContext(size, device, repeats, warmup, workers, samplers, max_steps, overrides, progress, workdir)
    report = {"machine": machine_info(command), "settings": ctx.settings(), "suites": {}}
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="benchmark", disable=not progress):
        t = time.perf_counter()
        out = SUITE_FUNCTIONS[name](ctx)
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
            lines.append(f"- memory: {', '.join(sorted(memkind))} (see common/benchmark.py)")
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
