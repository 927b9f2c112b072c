"""LDM-3D benchmark suites: training iterations (fp32 / bf16 / gradient checkpointing) and sampling
(DDPM / DDIM / rectified flow). Networks, losses and schedules are built from the bundle's own configs
(``paper``: inference.json + train_autoencoder.json + train_diffusion.json; ``demo``: + demo.json), with
random weights and random inputs: speed and memory do not depend on the values."""

from __future__ import annotations

import copy
from typing import Sequence

from common.benchmarks.diffusion import extrapolation_note, sampling_rows, training_row
from common.benchmarks.runner import BenchmarkContext, MemoryProbe, skipped

BUNDLE = "brats_mri_ldm3d"
CONFIGS = {"paper": ["inference.json", "train_autoencoder.json", "train_diffusion.json"]}
CONFIGS["demo"] = CONFIGS["paper"] + ["demo.json"]


def bundle_parser(ctx: BenchmarkContext, **extra):
    """The bundle's configs at ``ctx.size`` with ``ctx.overrides`` (config ids; an unknown id is refused), on
    ``ctx.device``, the autoencoder built fresh instead of loaded from ``models/``."""
    from common.bundle import bundle_config

    parser = bundle_config(BUNDLE, CONFIGS[ctx.size])
    generic = {"phantom_serial_cases", "preprocess_variants"}
    unknown = sorted(k for k in ctx.overrides if k not in parser and k not in generic)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}: use config ids of bundles/{BUNDLE}/configs")
    parser.update({k: v for k, v in ctx.overrides.items() if k in parser})
    parser.update({"device": f"$torch.device('{ctx.device}')", "autoencoder": "$@autoencoder_def.to(@device)",
                   **extra})
    return parser


def random_mask(batch: int, spatial: Sequence[int], labels: Sequence[int], device, seed: int = 0):
    """A blob of tumour labels in the middle of the volume (values do not change speed, only shapes do)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros((batch, 1, *spatial))
    centre = [s // 2 for s in spatial]
    sl = tuple(slice(c - max(1, s // 6), c + max(1, s // 6)) for c, s in zip(centre, spatial))
    region = mask[(slice(None), slice(None), *sl)]
    region.copy_(torch.tensor(list(labels), dtype=torch.float32)[torch.randint(len(labels), region.shape, generator=g)])
    return mask.to(device)


def random_batches(parser, batch_size: int, n: int, device) -> list[dict]:
    import torch

    spatial = parser["spatial_size"]
    g = torch.Generator().manual_seed(0)
    image = torch.randn((batch_size, len(parser["contrasts"]), *spatial), generator=g).to(device)
    label = random_mask(batch_size, spatial, parser["condition_labels"], device)
    return [{"image": image, "label": label} for _ in range(n)]


def stage1_trainer(parser, batches, amp=None):
    """The bundle's stage-1 trainer (generator, discriminator, loss terms, weights) on in-memory batches."""
    import torch

    from common.engines import AdversarialTrainer

    p = parser.get_parsed_content
    ae, disc = p("autoencoder"), p("discriminator")
    return AdversarialTrainer(
        device=p("device"), max_epochs=1, train_data_loader=batches, generator=ae,
        optimizer=torch.optim.Adam(ae.parameters(), lr=p("ae_lr")), losses=p("ae_losses"), discriminator=disc,
        d_optimizer=torch.optim.Adam(disc.parameters(), lr=p("d_lr")), adversarial_weight=p("adversarial_weight"),
        adversarial_warmup_iterations=0, amp=amp)


def stage2_trainer(parser, batches, amp=None):
    """The bundle's stage-2 trainer (conditioned latent UNet, noise schedule, condition dropout)."""
    import torch

    from common.engines import DiffusionTrainer

    p = parser.get_parsed_content
    network = p("network")
    return DiffusionTrainer(
        device=p("device"), max_epochs=1, train_data_loader=batches, network=network,
        optimizer=torch.optim.Adam(network.trainable_parameters(), lr=p("diffusion_lr")),
        scheduler=p("noise_scheduler"), autoencoder=p("autoencoder"), condition_key="label",
        condition_dropout=p("condition_dropout"), amp=amp)


def _train_variant(ctx: BenchmarkContext, group: str, name: str, amp: str | None, checkpointing: bool = False) -> dict:
    def build():
        parser = bundle_parser(ctx, ae_gradient_checkpointing=checkpointing)
        batch_size = parser.get_parsed_content("batch_size" if group == "autoencoder" else "diffusion_batch_size")
        batches = random_batches(parser, batch_size, ctx.warmup + ctx.repeats, ctx.device)
        return (stage1_trainer if group == "autoencoder" else stage2_trainer)(parser, batches, amp), batch_size

    return training_row(ctx, group, name, build)


def train(ctx: BenchmarkContext) -> dict:
    """Seconds per training iteration of both stages: fp32 vs bf16 vs gradient checkpointing (fp16 on CUDA)."""
    on_cuda = ctx.device.type == "cuda"
    variants = [
        ("autoencoder", "fp32", None, False), ("autoencoder", "bf16 autocast", "bf16", False),
        ("autoencoder", "fp32 + checkpointing", None, True),
        ("autoencoder", "bf16 autocast + checkpointing", "bf16", True),
        ("autoencoder", "fp16 autocast + GradScaler", "fp16", False),
        ("diffusion", "fp32", None, False), ("diffusion", "bf16 autocast", "bf16", False),
        ("diffusion", "fp16 autocast + GradScaler", "fp16", False),
    ]
    # one untimed iteration per group first, so one-off process costs (kernel/primitive caches, allocator
    # arenas, lazy initialisation) are not charged to whichever variant happens to run first
    primer = copy.copy(ctx)
    primer.repeats, primer.warmup, primer.progress = 1, 0, False
    for group in ("autoencoder", "diffusion"):
        _train_variant(primer, group, "primer", None)
    results = []
    for group, name, amp, ckpt in variants:
        if amp == "fp16" and not on_cuda:
            results.append(skipped(group, name, "needs CUDA"))
        else:
            results.append(_train_variant(ctx, group, name, amp, ckpt))
    p = bundle_parser(ctx)
    notes = [
        f"networks from bundles/{BUNDLE}/configs ({ctx.size}: {' + '.join(CONFIGS[ctx.size])}): input "
        f"{len(p['contrasts'])}x{'x'.join(map(str, p['spatial_size']))}, AE channels {p['ae_channels']}, "
        f"UNet base {p['unet_base_channels']} x {p['unet_channel_mult']}",
        "autoencoder iteration = generator step (the config's loss terms + adversarial; perceptual off: no local "
        "weights) + patch-discriminator step; diffusion iteration = frozen-AE encode + conditioned UNet step",
        "checkpointing = MONAI AutoencoderKL use_checkpoint (activation recomputation in the backward pass)",
    ]
    return {"results": results, "notes": notes}


def sample(ctx: BenchmarkContext) -> dict:
    """Seconds per sample of the bundle's sampler for DDPM / DDIM / rectified flow at their step counts."""
    import torch

    from common.samplers import DiffusionSampler, make_scheduler

    parser = bundle_parser(ctx)
    p = parser.get_parsed_content
    device = ctx.device
    mem = MemoryProbe(device)
    mem.start()
    torch.manual_seed(0)
    network = p("network").eval()
    network.scale_factor.fill_(1.0)  # random weights: any positive scale
    mask = random_mask(1, p("spatial_size"), p("condition_labels"), device)
    guidance = float(p("guidance_scale"))
    model_mib = mem.peak_mib()
    betas = (p("beta_schedule"), p("beta_start"), p("beta_end"))

    def sampler_for(kind: str, steps: int):
        # MONAI's DDPM runs every training step: a k-step schedule costs what k of 1000 cost
        sched = make_scheduler(kind, steps if kind == "ddpm" else p("num_train_timesteps"), *betas)
        return DiffusionSampler(sched, num_inference_steps=steps, guidance_scale=guidance, num_samples=1,
                                progress=False)

    results, extrapolated_any = sampling_rows(ctx, network, mask, sampler_for)
    notes = [
        f"networks from bundles/{BUNDLE}/configs ({ctx.size}): image {len(p('contrasts'))}x"
        f"{'x'.join(map(str, p('spatial_size')))}, UNet base {p('unet_base_channels')} x {p('unet_channel_mult')}; "
        f"one mask, one sample per call, guidance scale {guidance}; the call includes the condition, the denoising "
        "loop and the decoder",
        f"networks ~{model_mib} MiB before sampling; peak memory per variant is on top of them",
    ]
    if extrapolated_any:
        notes.append(extrapolation_note(ctx))
    return {"results": results, "notes": notes, "network_memory_mib": model_mib}
