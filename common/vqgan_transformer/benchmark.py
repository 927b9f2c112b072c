"""Benchmark suites of the VQGAN + masked transformer bundle (run by :mod:`common.benchmarks.runner`).

* :func:`sample` -- ROI sampling on one transformer: one token at a time in raster order (the public code's
  sampler; the reference) against MaskGIT parallel decoding (``decoding_steps``), seconds per sample and
  network passes counted, both followed by the VQGAN decoder. On a CPU the raster decoder is timed over
  ``ctx.max_steps`` tokens and extrapolated linearly to the whole grid (every pass costs the same: the full
  sequence goes through the network); the row says so.
* :func:`train` -- seconds per training iteration of stage 1 (the shared ``AdversarialTrainer`` with the
  paper's terms except the perceptual one, which needs pretrained weights: L1, commitment, LGG/HGG
  cross-entropy, hinge adversarial with adaptive weight, feature matching) and of stage 2
  (:class:`MaskedTransformerTrainer`), fp32 against bf16 autocast (and fp16 on CUDA); stage 2 also with the
  codes precomputed once (``precompute_tokens``) instead of a frozen-VQGAN pass per iteration.

Sizes: ``paper`` = 128^3 ROIs, 4 levels to 8^3 tokens, 1024 x 128 codebook, transformer 24 x 16 heads x 1024;
``demo`` = 64^3 ROIs, 3 levels to the same 8^3 grid (so the decoders compare on the paper's 512 tokens) with
small networks. Any size key can be overridden (``--overrides``). Networks have random weights: speed does not
depend on them.
"""

from __future__ import annotations

import math

import torch

from common.benchmarks.runner import (BenchmarkContext, MemoryProbe, failed, iteration_times, quiet, result,
                                      skipped, time_calls)

__all__ = ["SIZES", "sizes", "sample", "train"]

SIZES = {
    "paper": {"roi_size": 128, "vqgan_channels": [64, 128, 256, 256], "num_res_layers": 2, "num_embeddings": 1024,
              "embedding_dim": 128, "discriminator_channels": 64, "discriminator_layers": 3, "hidden_size": 1024, "num_layers": 24,
              "num_heads": 16, "batch_size": 2, "transformer_batch_size": 8, "decoding_steps": 12,
              "guidance_scale": 1.0, "samples": 2},
    "demo": {"roi_size": 64, "vqgan_channels": [16, 32, 64], "num_res_layers": 1, "num_embeddings": 256,
             "embedding_dim": 32, "discriminator_channels": 16, "discriminator_layers": 3, "hidden_size": 128, "num_layers": 4, "num_heads": 4,
             "batch_size": 2, "transformer_batch_size": 4, "decoding_steps": 12, "guidance_scale": 1.0,
             "samples": 2},
}


def sizes(size: str, overrides: dict | None = None) -> dict:
    """The settings of ``size`` with ``overrides`` applied (unknown keys are refused)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    s = dict(SIZES[size])
    unknown = sorted(set(overrides or {}) - set(s))
    if unknown:
        raise ValueError(f"unknown vqgan_transformer override(s) {unknown}; known: {', '.join(sorted(s))}")
    s.update(overrides or {})
    return s


def _vqgan(s: dict, device):
    from common.vqgan_transformer.networks import ImportanceVQGAN, build_vqgan

    return ImportanceVQGAN(build_vqgan(channels=s["vqgan_channels"], num_res_layers=s["num_res_layers"],
                                       num_embeddings=s["num_embeddings"], embedding_dim=s["embedding_dim"],
                                       ddp_sync=False)).to(device)


def _networks(s: dict, device):
    from common.vqgan_transformer.networks import build_transformer

    vqgan = _vqgan(s, device)
    grid = vqgan.token_grid([s["roi_size"]] * 3)
    transformer = build_transformer(s["num_embeddings"], grid, s["hidden_size"], s["num_layers"], s["num_heads"],
                                    dropout=0.0).to(device)
    return vqgan, transformer


def _rois(n: int, s: dict, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 1, *[s["roi_size"]] * 3), generator=g) * 2 - 1).to(device)


def sample(ctx: BenchmarkContext) -> dict:
    """Raster (reference) vs MaskGIT parallel decoding on the same transformer: seconds and passes per sample."""
    from common.vqgan_transformer.sampling import maskgit_decode, raster_decode

    s = sizes(ctx.size, ctx.overrides)
    device = ctx.device
    results, notes = [], []
    torch.manual_seed(0)
    vqgan, transformer = _networks(s, device)
    vqgan.eval()
    transformer.eval()
    n_tokens = transformer.num_tokens
    n = int(s["samples"])
    labels, seeds = [i % 2 for i in range(n)], list(range(n))
    guidance = float(s["guidance_scale"])

    # raster: time `limit` single-token passes and extrapolate to the grid (the per-pass cost is constant)
    limit = n_tokens if not ctx.max_steps else min(n_tokens, int(ctx.max_steps))
    ctx.log(f"vqgan_sample: raster, {limit} of {n_tokens} tokens timed")
    try:
        mem = MemoryProbe(device)
        mem.start()

        part = time_calls(lambda: raster_decode(transformer, labels, seeds, guidance, max_tokens=limit),
                          ctx.repeats, ctx.warmup, device)
        decode = time_calls(lambda: vqgan.decode_tokens(torch.zeros((n, *transformer.grid_size), dtype=torch.long,
                                                                    device=device)), ctx.repeats, 0, device)
        per_sample = [(p * n_tokens / limit + d) / n for p, d in zip(part, decode)]
        results.append(result("decoding", "raster (1 token per pass)", per_sample, "s/sample", mem,
                              network_passes=n_tokens, extrapolated=limit < n_tokens, tokens=n_tokens))
        if limit < n_tokens:
            notes.append(f"raster decoding timed over {limit} of {n_tokens} tokens and extrapolated linearly")
    except Exception as exc:  # recorded, the run goes on
        results.append(failed("decoding", "raster (1 token per pass)", exc))

    steps = int(s["decoding_steps"])
    ctx.log(f"vqgan_sample: MaskGIT, {steps} steps")
    try:
        mem = MemoryProbe(device)
        mem.start()
        passes = {}

        def parallel():
            codes, info = maskgit_decode(transformer, labels, seeds, steps=steps, guidance_scale=guidance)
            passes.update(info)
            vqgan.decode_tokens(codes)

        times = time_calls(parallel, ctx.repeats, ctx.warmup, device)
        results.append(result("decoding", f"MaskGIT parallel ({steps} steps)", [t / n for t in times], "s/sample",
                              mem, network_passes=passes["network_passes"], tokens=n_tokens,
                              passes_ratio=n_tokens / passes["network_passes"]))
    except Exception as exc:
        results.append(failed("decoding", f"MaskGIT parallel ({steps} steps)", exc))
    notes.append(f"{n} samples per call (classes LGG/HGG alternating), guidance scale {guidance}; "
                 "random weights: speed only (sample quality is compared on the demo model in the docs)")
    return {"results": results, "notes": notes, "sizes": s}


def _amp_variants(device) -> list[tuple[str, str | None]]:
    variants = [("fp32", None), ("bf16", "bf16")]
    if torch.device(device).type == "cuda":
        variants.append(("fp16", "fp16"))
    return variants


def _run_trainer(ctx, make_trainer, group: str, name: str, iterations: int) -> dict:
    try:
        mem = MemoryProbe(ctx.device)
        mem.start()
        trainer = make_trainer()
        quiet(trainer)
        times = iteration_times(trainer, ctx.device)
        trainer.run()
        return result(group, name, times[ctx.warmup:], "s/iteration", mem)
    except Exception as exc:
        return failed(group, name, exc)


def train(ctx: BenchmarkContext) -> dict:
    """Seconds per iteration of both stages, fp32 vs bf16 (fp16 too on CUDA)."""
    from common.engines import AdversarialTrainer
    from common.engines.losses import L1, CrossEntropy, Quantization
    from common.vqgan_transformer.masking import HybridMasking
    from common.vqgan_transformer.networks import build_discriminator
    from common.vqgan_transformer.trainer import MaskedTransformerTrainer

    s = sizes(ctx.size, ctx.overrides)
    device = ctx.device
    iterations = ctx.warmup + ctx.repeats
    results = []
    for name, amp in _amp_variants(device):
        ctx.log(f"vqgan_train: stage 1 {name}")
        batch = {"image": _rois(s["batch_size"], s, device), "class": torch.arange(s["batch_size"]) % 2}

        def stage1(amp=amp, batch=batch):
            torch.manual_seed(0)
            vqgan = _vqgan(s, device)
            disc = build_discriminator(channels=s["discriminator_channels"], num_layers_d=s["discriminator_layers"]).to(device)
            return AdversarialTrainer(
                device, 1, [batch] * iterations, vqgan, torch.optim.Adam(vqgan.parameters(), 1e-4),
                losses={"l1": L1(0.8), "quantization": Quantization(1.0), "classification": CrossEntropy(0.2)},
                discriminator=disc, d_optimizer=torch.optim.Adam(disc.parameters(), 1e-4),
                adversarial_weight=0.1, adversarial_criterion="hinge", adaptive_weight=True,
                last_layer=vqgan.last_layer, feature_matching_weight=1.0, amp=amp)

        results.append(_run_trainer(ctx, stage1, "vqgan_iteration", name, iterations))
    for name, amp in _amp_variants(device):
        ctx.log(f"vqgan_train: stage 2 {name}")
        batch = {"image": _rois(s["transformer_batch_size"], s, device),
                 "class": torch.arange(s["transformer_batch_size"]) % 2}

        def stage2(amp=amp, batch=batch):
            torch.manual_seed(0)
            vqgan, transformer = _networks(s, device)
            return MaskedTransformerTrainer(
                device, 1, [batch] * iterations, transformer, torch.optim.AdamW(transformer.parameters(), 1e-4),
                vqgan, HybridMasking(s["num_embeddings"], topk_ratio=0.25), amp=amp)

        results.append(_run_trainer(ctx, stage2, "transformer_iteration", name, iterations))
    ctx.log("vqgan_train: stage 2 fp32, codes precomputed")
    batch = {"image": _rois(s["transformer_batch_size"], s, device),
             "class": torch.arange(s["transformer_batch_size"]) % 2}

    def stage2_cached(batch=batch):
        torch.manual_seed(0)
        vqgan, transformer = _networks(s, device)
        tokens, importance = vqgan.eval().tokens(batch["image"])
        cached = {"tokens": tokens, "importance": importance, "class": batch["class"]}
        return MaskedTransformerTrainer(
            device, 1, [cached] * iterations, transformer, torch.optim.AdamW(transformer.parameters(), 1e-4),
            vqgan, HybridMasking(s["num_embeddings"], topk_ratio=0.25))

    results.append(_run_trainer(ctx, stage2_cached, "transformer_iteration", "fp32, codes precomputed", iterations))
    if device.type == "cpu":
        results.append(skipped("vqgan_iteration", "fp16", "fp16 autocast needs CUDA"))
    notes = [f"stage 1 batch {s['batch_size']} ROIs of {s['roi_size']}^3, stage 2 batch {s['transformer_batch_size']}; "
             "stage 1 without the perceptual term (pretrained weights); "
             f"token grid {[s['roi_size'] // 2 ** len(s['vqgan_channels'])] * 3}"]
    return {"results": results, "notes": notes, "sizes": s, "tokens": math.prod(
        [s["roi_size"] // 2 ** len(s["vqgan_channels"])] * 3)}
