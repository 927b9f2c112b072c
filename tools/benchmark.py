"""``python -m tools benchmark``: measured speed and memory of the pipeline's steps, variants side by side."""

from __future__ import annotations


def benchmark(suite: str = "all", size: str = "demo", device: str = "auto", repeats: int = 3, warmup: int = 1,
              out: str = "bench.json", samplers: str = "ddpm:1000,ddim:50,rflow:30", max_steps: int | None = None,
              workers: int | None = None, guidance_scale: float = 1.0, overrides: dict | None = None,
              progress: bool = True):
    """Time and measure the memory of the pipeline's steps, variants side by side (suites: common.benchmarks.SUITES).

    Variants of a suite run one after the other in this process on the same inputs; the first of each group is
    the reference. The JSON report and a Markdown table (same name, .md) hold the machine (CPU, cores, RAM, GPU,
    versions, date, command line): quote figures with it. Median [min-max] over repeats, warm-up excluded.

    Args:
        suite: a suite name (phantoms, preprocess, engine, ldm3d_train, ldm3d_sample, ... see
            ``python -m tools benchmark --suite help``), all, or a comma-separated list.
        size: demo (bundle demo.json sizes, runs on a laptop CPU) | paper (the bundle's main configs).
        device: auto | cpu | cuda (LDM suites; phantoms and preprocessing always run on the CPU).
        repeats: timed repetitions per variant.
        warmup: untimed repetitions before them (CUDA kernels selection, caches).
        out: JSON report path; the Markdown table is written beside it (.md).
        samplers: sampler:steps list for ldm3d_sample (ddpm must use the training steps, 1000).
        max_steps: time at most this many denoising steps per sampler and extrapolate linearly (said in the
            report). Default: 20 on a CPU, full runs on CUDA; 0 = always full.
        workers: processes for the parallel phantom variant (default: usable CPU cores).
        guidance_scale: classifier-free guidance weight while sampling (> 1 doubles the UNet batch).
        overrides: settings on top of --size, e.g. --overrides "{'unet_base_channels': 352}" (the paper's
            larger UNet) or "{'spatial_size': [160, 160, 96], 'batch_size': 1}": config ids of the bundle a suite
            builds from, plus phantom_shape, phantom_cases, phantom_serial_cases for the data suites.
        progress: show a progress bar over suites.
    """
    import shlex
    import sys

    from common.benchmarks import SUITES, run_benchmark, save_report, to_markdown

    if suite == "help":
        for name, where in SUITES.items():
            print(f"  {name:<16} {where}")
        return

    command = " ".join(shlex.quote(a) for a in sys.argv)
    if sys.argv and sys.argv[0].endswith("tools/__main__.py"):
        command = "python -m tools " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_benchmark(command=command,
        suite=suite, size=size, device=device, repeats=repeats, warmup=warmup, workers=workers, samplers=samplers,
        max_steps=max_steps, overrides={**(overrides or {}), "guidance_scale": guidance_scale}, progress=progress,
    )
    json_path, md_path = save_report(report, out)
    print(to_markdown(report))
    print(f"wrote {json_path} and {md_path}")
