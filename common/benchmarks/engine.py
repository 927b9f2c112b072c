"""Engine suite: the shared trainers against a plain PyTorch loop doing the same work -- the same networks (built
from the LDM-3D bundle's configs), the same batches, the same losses and optimizer steps -- side by side, so the
cost of the engine itself (ignite events, handlers, EMA hooks, output decollation, loss bookkeeping) is measured.

Variants are interleaved (ours, plain, ours, plain...) in rounds, each round re-building both from the same seed,
so a change of background load hits both alike; the figure is the median over all timed iterations."""

from __future__ import annotations

import contextlib
import time

from common.benchmarks.runner import BenchmarkContext, failed, iteration_times, quiet, result, sync
from common.ldm3d.benchmark import bundle_parser, random_batches, stage1_trainer, stage2_trainer


def _autocast(device, amp):
    import torch

    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _plain_stage1(parser, batches, amp, device) -> list[float]:
    """What AdversarialTrainer does per iteration, written as a bare loop (L1 + KL + adversarial, then D)."""
    import torch
    from monai.losses import PatchAdversarialLoss

    from common.engines.losses import kl_divergence

    p = parser.get_parsed_content
    ae, disc = p("autoencoder"), p("discriminator")
    opt = torch.optim.Adam(ae.parameters(), lr=p("ae_lr"))
    d_opt = torch.optim.Adam(disc.parameters(), lr=p("d_lr"))
    terms = p("ae_losses")
    w_l1, w_kl, w_adv = terms["l1"].weight, terms["kl"].weight, p("adversarial_weight")
    w_ssim = terms["ssim"].weight if terms["ssim"].active else 0.0
    ssim_term = terms["ssim"]
    adv = PatchAdversarialLoss(criterion="least_squares", reduction="mean")
    times = []
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        x = batch["image"].float()
        ae.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            recon, mu, sigma = ae(x)
        recon = recon.float()
        loss = w_l1 * (recon - x).abs().mean() + w_kl * kl_divergence(mu, sigma)
        if w_ssim:
            loss = loss + w_ssim * ssim_term(recon, x, {}, batch)
        with _autocast(device, amp):
            fake = disc(recon.contiguous())[-1]
        loss = loss + w_adv * adv(fake.float(), target_is_real=True, for_discriminator=False)
        loss.backward()
        opt.step()
        disc.train()
        d_opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            fake = disc(recon.detach().contiguous())[-1]
            real = disc(x.contiguous())[-1]
        d_loss = 0.5 * (adv(fake.float(), target_is_real=False, for_discriminator=True)
                        + adv(real.float(), target_is_real=True, for_discriminator=True))
        d_loss.backward()
        d_opt.step()
        float(loss.detach()), float(d_loss.detach())  # the engine reads its scalars too
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _plain_stage2(parser, batches, amp, device) -> list[float]:
    """What DiffusionTrainer does per iteration: encode, noise, conditioned UNet step with condition dropout."""
    import torch
    import torch.nn.functional as F

    p = parser.get_parsed_content
    network, ae, sched = p("network"), p("autoencoder"), p("noise_scheduler")
    ae.requires_grad_(False)
    opt = torch.optim.Adam(network.trainable_parameters(), lr=p("diffusion_lr"))
    dropout = p("condition_dropout")
    times = []
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        x, mask = batch["image"].float(), batch["label"].float()
        with torch.no_grad(), _autocast(device, amp):
            z = ae.encode_stage_2_inputs(x)
        z = z.float()
        if not float(network.scale_factor) > 0:
            network.scale_factor.fill_(1.0 / float(z.std()))
        z = z * network.scale_factor
        noise = torch.randn_like(z)
        t = torch.randint(0, sched.num_train_timesteps, (z.shape[0],), device=device)
        noisy = sched.add_noise(original_samples=z, noise=noise, timesteps=t)
        drop = torch.rand(z.shape[0], device=device) < dropout
        network.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            pred = network(noisy, t, condition=mask, drop_condition=drop)
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        float(loss.detach())
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _ours(build, parser, batches, amp, device) -> list[float]:
    trainer = build(parser, batches, amp)
    quiet(trainer)
    times = iteration_times(trainer, device)
    trainer.run()
    return times


def engine(ctx: BenchmarkContext) -> dict:
    """Seconds per iteration: the shared trainers vs a plain loop of the same work, fp32 and bf16, both stages."""
    import torch

    results = []
    rounds = max(2, ctx.repeats)
    stages = [("autoencoder", stage1_trainer, _plain_stage1, "batch_size"),
              ("diffusion", stage2_trainer, _plain_stage2, "diffusion_batch_size")]
    for group, ours_build, plain_loop, batch_key in stages:
        for amp, label in ((None, "fp32"), ("bf16", "bf16 autocast")):
            timed: dict[str, list[float]] = {"plain loop": [], "ours": []}
            broken: dict[str, BaseException] = {}
            for r in range(rounds):
                for name in ("plain loop", "ours"):
                    if name in broken:
                        continue
                    ctx.log(f"engine: {group} {label} {name} (round {r + 1}/{rounds})")
                    torch.manual_seed(0)
                    parser = bundle_parser(ctx)
                    batches = random_batches(parser, parser.get_parsed_content(batch_key), ctx.warmup + 3,
                                             ctx.device)
                    try:
                        if name == "ours":
                            times = _ours(ours_build, parser, batches, amp, ctx.device)
                        else:
                            times = plain_loop(parser, batches, amp, ctx.device)
                    except (FloatingPointError, RuntimeError) as exc:  # e.g. a non-finite bf16 loss on CPU
                        broken[name] = exc
                        continue
                    timed[name] += times[ctx.warmup:]
            for name in ("plain loop", "ours"):
                if name in broken:
                    results.append(failed(f"{group} {label}", name, broken[name]))
                else:
                    results.append(result(f"{group} {label}", name, timed[name], "s/iteration",
                                          iterations=len(timed[name]), rounds=rounds))
    notes = [
        f"networks, losses and batch sizes from bundles/brats_mri_ldm3d/configs ({ctx.size}); random inputs",
        "plain loop = the same forward/backward/optimizer steps with no ignite engine, no handlers and no output "
        "bookkeeping; speedup < 1 means ours is slower (engine overhead = 1/speedup - 1)",
        f"interleaved rounds: {rounds} x (plain, ours), {3} timed iterations each after {ctx.warmup} warm-up",
    ]
    return {"results": results, "notes": notes}
