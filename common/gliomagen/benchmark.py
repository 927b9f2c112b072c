"""GliomaGen benchmark suites: the network's training iteration (fp32 / bf16 / bf16 + checkpointing) and
sampling (DDPM-1000 / DDIM / rectified flow) built from the bundle's configs; mask augmentation per draw; and mass
synthesis in 1 vs N processes.

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


# --------------------------------------------------------------------------- the network: training and sampling
BUNDLE_CONFIGS = {"paper": ["inference.json", "train.json"], "demo": ["inference.json", "train.json", "demo.json"]}


def _parser(ctx: BenchmarkContext, **extra):
    """The bundle's configs at ``ctx.size`` (``ctx.overrides`` are config ids; an unknown one is refused)."""
    from common.bundle import bundle_config

    parser = bundle_config("brats_mri_gliomagen", BUNDLE_CONFIGS[ctx.size])
    unknown = sorted(k for k in ctx.overrides if k not in parser and k != "guidance_scale")
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}: use config ids of bundles/brats_mri_gliomagen/configs")
    parser.update({k: v for k, v in ctx.overrides.items() if k in parser})
    parser.update({"device": f"$torch.device('{ctx.device}')", **extra})
    return parser


def _mask(parser, batch: int, device):
    """A 6-label mask: the head filling the middle of the grid, a tumor with every compartment inside it."""
    import torch

    spatial = [int(s) for s in parser["spatial_size"]]
    mask = torch.zeros((batch, 1, *spatial))
    head = tuple(slice(s // 8, s - s // 8) for s in spatial)
    mask[(slice(None), slice(None), *head)] = 1
    c = [s // 2 for s in spatial]
    for label, r in ((3, 4), (4, 3), (2, 2), (5, 1)):  # SNFH around ET around NETC, a cavity inside
        box = tuple(slice(ci - max(1, s * r // 32), ci + max(1, s * r // 32)) for ci, s in zip(c, spatial))
        mask[(slice(None), slice(None), *box)] = label
    return mask.to(device)


def train(ctx: BenchmarkContext) -> dict:
    """Seconds per training iteration of the bundle's DiffusionTrainer: fp32 vs bf16 vs bf16 + gradient
    checkpointing (fp16 on CUDA)."""
    import torch

    from common.benchmarks.diffusion import training_row
    from common.benchmarks.runner import skipped
    from common.engines import DiffusionTrainer

    def variant(amp, checkpointing):
        def build():
            p = _parser(ctx, gradient_checkpointing=checkpointing).get_parsed_content
            network = p("network")
            batch = int(p("batch_size"))
            g = torch.Generator().manual_seed(0)
            spatial = p("spatial_size")
            image = torch.rand((batch, len(p("contrasts")), *spatial), generator=g).to(ctx.device)
            batches = [{"image": image, "label": _mask(_parser(ctx), batch, ctx.device)}] * (ctx.warmup + ctx.repeats)
            trainer = DiffusionTrainer(
                device=p("device"), max_epochs=1, train_data_loader=batches, network=network,
                optimizer=torch.optim.Adam(network.parameters(), lr=p("lr")), scheduler=p("noise_scheduler"),
                condition_key="label", condition_dropout=p("condition_dropout"), loss="l1", amp=amp,
                ema_decay=p("ema_decay"))
            return trainer, batch
        return build

    results = []
    for name, amp, ckpt in (("fp32", None, False), ("bf16 autocast", "bf16", False),
                            ("bf16 autocast + checkpointing", "bf16", True),
                            ("fp16 autocast + GradScaler", "fp16", False)):
        if amp == "fp16" and ctx.device.type != "cuda":
            results.append(skipped("diffusion", name, "needs CUDA"))
        else:
            results.append(training_row(ctx, "diffusion", name, variant(amp, ckpt)))
    p = _parser(ctx)
    notes = [f"network from bundles/brats_mri_gliomagen/configs ({ctx.size}): input {len(p['contrasts'])}+6 x "
             f"{'x'.join(map(str, p['spatial_size']))}, UNet base {p['unet_base_channels']} x {p['unet_channel_mult']}; "
             "iteration = DDPM noise + conditioned UNet step (L1) + EMA update",
             "checkpointing = common.networks.checkpoint_blocks (each UNet block recomputed in the backward pass)"]
    return {"results": results, "notes": notes}


def sample(ctx: BenchmarkContext) -> dict:
    """Seconds per 4-contrast sample of the bundle's sampler: DDPM-1000 (the paper's) vs DDIM vs rectified flow."""
    import torch

    from common.benchmarks.diffusion import extrapolation_note, sampling_rows
    from common.benchmarks.runner import MemoryProbe
    from common.samplers import DiffusionSampler, make_scheduler

    parser = _parser(ctx)
    p = parser.get_parsed_content
    mem = MemoryProbe(ctx.device)
    mem.start()
    torch.manual_seed(0)
    network = p("network_def").to(ctx.device).eval()
    mask = _mask(parser, 1, ctx.device)
    guidance = float(ctx.overrides.get("guidance_scale", p("guidance_scale")))
    model_mib = mem.peak_mib()

    def sampler_for(kind: str, steps: int):
        sched = make_scheduler(kind, steps if kind == "ddpm" else p("num_train_timesteps"), p("beta_schedule"),
                               prediction_type=p("prediction_type"), clip_sample=p("clip_sample"),
                               clip_range=p("clip_range"))
        return DiffusionSampler(sched, num_inference_steps=steps, guidance_scale=guidance, progress=False)

    results, extrapolated = sampling_rows(ctx, network, mask, sampler_for)
    notes = [f"network from bundles/brats_mri_gliomagen/configs ({ctx.size}): one 4x"
             f"{'x'.join(map(str, p('spatial_size')))} sample per call, guidance {guidance}; random weights",
             f"network ~{model_mib} MiB before sampling"]
    if extrapolated:
        notes.append(extrapolation_note(ctx))
    return {"results": results, "notes": notes}


def quality(ctx: BenchmarkContext) -> dict:
    """Quality against steps on the committed demo model: for each ``ctx.samplers`` entry, samples from held-out
    phantom masks, their seconds, the compartment-signature error against the real phantom of the same mask
    (mean |generated - real| of each compartment's mean intensity, [0, 1] units, lower is better) and the
    mask-agreement score (eta^2, the synthesis quality score)."""
    import tempfile
    import time

    import numpy as np

    from common.bundle import bundle_config, phantom_datalist, prepare_cases
    from common.benchmarks.runner import SAMPLER_NAMES, result
    from common.generation.synthesis import mask_agreement_score
    from common.gliomagen.demo import DEMO_CONFIGS, HELD_OUT_SEED
    from common.io import load_nifti
    from common.samplers import DiffusionSampler, make_scheduler

    if ctx.size != "demo":
        raise ValueError("the quality suite scores the committed demo weights: use --size demo")
    n_masks = int(ctx.overrides.get("quality_masks", 4))
    parser = bundle_config("brats_mri_gliomagen", DEMO_CONFIGS, device=f"$torch.device('{ctx.device}')")
    p = parser.get_parsed_content
    network, contrasts = p("network"), p("contrasts")
    import torch

    with tempfile.TemporaryDirectory(dir=ctx.workdir) as tmp:
        datalist = phantom_datalist(tmp, n=n_masks, shape=parser["phantom_shape"], seed=HELD_OUT_SEED, folds=1,
                                    layout="brats2024", progress=False)
        cases = prepare_cases(datalist, f"{tmp}/cases", "brats_mri_gliomagen", DEMO_CONFIGS,
                              section=("training", "validation"), progress=False)
        real = [({c: load_nifti(case[c])[0] for c in contrasts}, load_nifti(case["label"])[0]) for case in cases]
    results = []
    for kind, steps in ctx.samplers:
        sched = make_scheduler(kind, p("num_train_timesteps"), p("beta_schedule"), prediction_type=p("prediction_type"),
                               clip_sample=p("clip_sample"), clip_range=p("clip_range"))
        sampler = DiffusionSampler(sched, num_inference_steps=steps, seed=0, progress=False)
        ctx.log(f"gliomagen_quality: {kind} {steps} steps on {len(real)} masks")
        times, errors, scores = [], [], []
        for images, labels in real:
            cond = torch.as_tensor(labels.astype(np.float32))[None, None].to(ctx.device)
            start = time.perf_counter()
            gen = sampler(cond, network)[0].float().cpu().numpy()
            times.append(time.perf_counter() - start)
            volumes = dict(zip(contrasts, gen))
            for c in contrasts:
                for lab in range(2, 6):
                    if np.any(labels == lab):
                        errors.append(abs(float(volumes[c][labels == lab].mean() - images[c][labels == lab].mean())))
            scores.append(mask_agreement_score(volumes, labels, scheme="six_label"))
        results.append(result("per_sample", f"{SAMPLER_NAMES[kind]}-{steps}", times,
                              "s/sample", signature_error=float(np.mean(errors)),
                              mask_agreement=float(np.mean([s for s in scores if s is not None]))))
    real_scores = [mask_agreement_score(images, labels, scheme="six_label") for images, labels in real]
    notes = [f"committed demo weights (bundles/brats_mri_gliomagen/models, {'x'.join(map(str, parser['spatial_size']))}); "
             f"{len(real)} held-out phantom masks (seed {HELD_OUT_SEED}), 1 sample each, seed 0",
             "signature_error: mean over masks, contrasts and tumor compartments of |mean generated - mean real "
             "intensity| in [0, 1] units (lower is better)",
             f"mask_agreement: eta^2 of the intensities with the compartments (the synthesis quality score); the real "
             f"phantoms score {float(np.mean([s for s in real_scores if s is not None])):.3f}"]
    return {"results": results, "notes": notes}
