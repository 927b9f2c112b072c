"""Benchmark suites of the cGAN imputation method (``common.benchmarks.runner``; register
``"cgan_impute": "common.cgan_imputation.benchmark:impute"`` and ``"cgan_train": "...:train"`` in its SUITES).

* ``impute`` -- seconds to impute one 240x240x155 volume with :func:`impute_volume` (the code
  ``python -m tools impute`` runs), axial slices in batches of 1, 16 and 64, fp32, and batch 16 under bf16
  autocast. On a CPU only ``cgan_slices`` slices (default 64) are run and the time is scaled to the whole volume
  (``extrapolated``: the per-slice cost does not depend on the slice index).
* ``train`` -- seconds per pix2pix iteration (one discriminator step + one generator step with adversarial
  (MONAI ``PatchAdversarialLoss``, BCE as pix2pix), L1 and lesion-mask L1, Adam 2e-4, betas (0.5, 0.999)) on
  ``batch_size x batch_samples`` slices of 256x256, fp32 vs bf16 autocast. A plain step: the shared
  ``AdversarialTrainer`` adds only bookkeeping around the same two backward passes.

Sizes: ``paper`` = 9 ResNet blocks, 64 filters, 70x70 PatchGAN with 64 filters, the paper's T2 -> FLAIR batch
(2 volumes x 2 slices); ``demo`` = the bundle's CPU demo networks (3 blocks, 16 filters). Inputs are random:
speed does not depend on the values. Overrides (``--overrides``): ``base_channels``, ``n_blocks``,
``disc_channels``, ``n_sources``, ``batch_size``, ``batch_samples``, ``spatial_size``, ``cgan_volume``,
``cgan_slices``, ``cgan_batches``.
"""

from __future__ import annotations

from typing import Any

from common.benchmarks.runner import BenchmarkContext, MemoryProbe, failed, result, time_calls

SHARED = {"guidance_scale"}  # always put in by ``python -m tools benchmark`` for the sampling suites
KNOWN = {"base_channels", "n_blocks", "disc_channels", "n_sources", "batch_size", "batch_samples", "spatial_size",
         "cgan_volume", "cgan_slices", "cgan_batches"}


def sizes(ctx: BenchmarkContext) -> dict[str, Any]:
    """Network and batch settings of ``ctx.size`` with the overrides applied (unknown keys refused)."""
    from common.cgan_imputation.networks import DEMO_DISCRIMINATOR, DEMO_GENERATOR, PAPER_DISCRIMINATOR, PAPER_GENERATOR

    unknown = sorted(set(ctx.overrides) - KNOWN - SHARED)
    if unknown:
        raise ValueError(f"cgan benchmark: unknown overrides {unknown}; known: {sorted(KNOWN)}")
    paper = ctx.size == "paper"
    gen, disc = (PAPER_GENERATOR, PAPER_DISCRIMINATOR) if paper else (DEMO_GENERATOR, DEMO_DISCRIMINATOR)
    s = {"base_channels": gen["base_channels"], "n_blocks": gen["n_blocks"], "disc_channels": disc["channels"],
         "n_sources": 1, "batch_size": 2, "batch_samples": 2, "spatial_size": [256, 256],
         "cgan_volume": [240, 240, 155], "cgan_slices": None, "cgan_batches": [1, 16, 64]}
    s.update({k: v for k, v in ctx.overrides.items() if k in KNOWN})
    return s


def _generator(s: dict, device):
    from common.cgan_imputation.networks import build_generator

    return build_generator(int(s["n_sources"]), None, base_channels=int(s["base_channels"]),
                           n_blocks=int(s["n_blocks"])).to(device)


def impute(ctx: BenchmarkContext) -> dict:
    """Seconds per 240x240x155 volume, slices batched 1 / 16 / 64 (fp32) and 16 (bf16)."""
    import torch

    from common.cgan_imputation.impute import impute_volume

    s = sizes(ctx)
    x, y, z = (int(v) for v in s["cgan_volume"])
    slices = int(s["cgan_slices"] or (z if ctx.device.type == "cuda" else min(z, 64)))
    scale = z / slices
    gen = _generator(s, ctx.device).eval()
    g = torch.Generator().manual_seed(0)
    source = torch.rand((int(s["n_sources"]), x, y, slices), generator=g)
    source[:, : x // 8], source[:, -x // 8:] = 0, 0  # a background margin, as around a brain
    variants = [(int(b), None) for b in s["cgan_batches"]] + [(16, torch.bfloat16)]
    results, notes = [], []
    if scale != 1:
        notes.append(f"{slices} of {z} slices timed, scaled x{scale:.2f} to the whole volume (CPU)")
    for batch, amp in variants:
        name = f"batch {batch}" + (" bf16" if amp else " fp32")
        ctx.log(f"cgan impute: {name}, {slices} slices of {x}x{y}")
        mem = MemoryProbe(ctx.device)
        mem.start()
        try:
            times = time_calls(lambda: impute_volume(gen, source, batch=batch, device=ctx.device,
                                                     spatial_size=s["spatial_size"], amp_dtype=amp),
                               ctx.repeats, ctx.warmup, ctx.device)
        except Exception as exc:  # out of memory at batch 64 on a small GPU is a result too
            results.append(failed("impute", name, exc))
            continue
        results.append(result("impute", name, [t * scale for t in times], "s/volume", mem, batch=batch,
                              slices_timed=slices, extrapolated=scale != 1, volume=[x, y, z]))
    return {"results": results, "notes": notes, "sizes": s}


def train(ctx: BenchmarkContext) -> dict:
    """Seconds per pix2pix iteration (D step + G step), fp32 vs bf16 autocast."""
    import torch
    from monai.losses import PatchAdversarialLoss

    from common.cgan_imputation.networks import build_discriminator

    s = sizes(ctx)
    n = int(s["batch_size"]) * int(s["batch_samples"])
    h, w = (int(v) for v in s["spatial_size"])
    g = torch.Generator().manual_seed(0)
    src = torch.rand((n, int(s["n_sources"]), h, w), generator=g).to(ctx.device)
    tgt = torch.rand((n, 1, h, w), generator=g).to(ctx.device)
    mask = (torch.rand((n, 1, h, w), generator=g) > 0.9).float().to(ctx.device)
    adv = PatchAdversarialLoss(criterion="bce")
    l1_weight, mask_weight = 118.74, 151.04  # the paper's T2 -> FLAIR values
    results = []
    for name, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        ctx.log(f"cgan train: {name}, {n} slices of {h}x{w}")
        torch.manual_seed(0)
        gen = _generator(s, ctx.device).train()
        disc = build_discriminator(int(s["n_sources"]), None, channels=int(s["disc_channels"]),
                                   num_layers_d=3).to(ctx.device).train()
        opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))

        def step():
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                fake = gen(src)
                d_fake = disc(torch.cat([src, fake.detach()], 1))[-1]
                d_real = disc(torch.cat([src, tgt], 1))[-1]
                loss_d = 0.5 * (adv(d_fake, target_is_real=False, for_discriminator=True)
                                + adv(d_real, target_is_real=True, for_discriminator=True))
            opt_d.zero_grad(set_to_none=True)
            loss_d.float().backward()
            opt_d.step()
            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                g_adv = adv(disc(torch.cat([src, fake], 1))[-1], target_is_real=True, for_discriminator=False)
                l1 = (fake.float() - tgt).abs().mean()
                masked = ((fake.float() - tgt) * mask).abs().mean()
                loss_g = g_adv.float() + l1_weight * l1 + mask_weight * masked
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if not torch.isfinite(loss_g):
                raise FloatingPointError(f"generator loss {float(loss_g)}")

        mem = MemoryProbe(ctx.device)
        mem.start()
        try:
            times = time_calls(step, ctx.repeats, ctx.warmup, ctx.device)
        except Exception as exc:
            results.append(failed("train_iteration", name, exc))
            continue
        results.append(result("train_iteration", name, times, "s/iteration", mem, slices=n,
                              slice_size=[h, w]))
        del gen, disc, opt_g, opt_d
    return {"results": results, "notes": ["plain D + G step (pix2pix), not the shared AdversarialTrainer"],
            "sizes": s}
