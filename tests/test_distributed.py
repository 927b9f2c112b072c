"""Real 2-process CPU (gloo) training through torchrun + ignite.distributed.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2`` (the same entry
point as ``torchrun``); the ``__main__`` block below is the worker. Checks: process group set up from the
environment, DDP averages gradients (same weights as one process on the concatenated batches), both
ranks end identical, the sampler partitions the data, the latent scale factor is pooled over ranks,
only rank 0 writes the checkpoint (which holds both ranks' RNG states), and an adversarial autoencoder
killed mid-epoch and resumed on 2 processes ends bit-identical to an uninterrupted 2-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES, BATCH, EPOCHS = 8, 2, 2


class ToyAE(torch.nn.Module):
    """Deterministic 'autoencoder' (no sampling), so gradients can be compared exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x), torch.zeros_like(x), torch.ones_like(x)


class ToyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 2, stride=2)

    def encode_stage_2_inputs(self, x):
        return self.conv(x)


class ToyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float().view(-1, 1, 1, 1, 1) / 1000)


def dataset():
    g = torch.Generator().manual_seed(11)
    return [{"image": torch.rand(1, 8, 8, 8, generator=g)} for _ in range(N_SAMPLES)]


def worker(out_dir: Path) -> None:
    from monai.networks.schedulers import DDPMScheduler

    import ignite.distributed as idist

    from common.engines import AdversarialTrainer, DiffusionTrainer, FullStateCheckpointer, make_dataloader
    from common.engines import distributed as dist
    from common.engines.losses import KL, L1

    torch.set_num_threads(1)
    device = dist.setup(seed=0)  # seeds 0 + rank: models differ until DDP broadcasts rank 0's weights
    rank, world = idist.get_rank(), idist.get_world_size()
    model = dist.wrap_model(ToyAE())
    loader = make_dataloader(dataset(), batch_size=BATCH, shuffle=True, seed=0)
    seen: list = []
    trainer = AdversarialTrainer(
        device, EPOCHS, loader, model, torch.optim.SGD(model.parameters(), lr=0.5), {"l1": L1()},
        train_handlers=[FullStateCheckpointer(out_dir / "ckpt", save_interval_iterations=1)],
    )
    losses: list = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (losses.append(e.state.output["loss"]),
                                                                seen.append(e.state.output["image"].sum().item())))
    trainer.run()
    torch.save(dist.unwrap(model).state_dict(), out_dir / f"ae_rank{rank}.pt")

    # latent diffusion: the scale factor comes from the first batches of *all* ranks
    torch.manual_seed(0)
    encoder, denoiser = ToyEncoder(), ToyDenoiser()
    denoiser.register_buffer("scale_factor", torch.tensor(float("nan")))
    denoiser = dist.wrap_model(denoiser)
    diff = DiffusionTrainer(device, 1, make_dataloader(dataset(), batch_size=BATCH, shuffle=True, seed=0), denoiser,
                            torch.optim.SGD(denoiser.parameters(), lr=0.1), DDPMScheduler(1000), autoencoder=encoder)
    diff.run()
    torch.save(dist.unwrap(denoiser).state_dict(), out_dir / f"diff_rank{rank}.pt")
    # adversarial autoencoder under DDP: generator step through the discriminator, then two D forwards;
    # run once straight, once killed mid-epoch and resumed (per-rank RNG states must come back)
    from monai.networks.nets import AutoencoderKL, PatchDiscriminator

    class Killed(Exception):
        pass

    def gan_run(ckpt_dir, kill_at=None):
        torch.manual_seed(100 + rank)
        ae = dist.wrap_model(AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4),
                                           latent_channels=1, num_res_blocks=1, attention_levels=(False, False),
                                           norm_num_groups=2))
        disc = dist.wrap_model(PatchDiscriminator(spatial_dims=3, num_layers_d=1, channels=4, in_channels=1,
                                                  out_channels=1))
        gan = AdversarialTrainer(device, 2, make_dataloader(dataset(), batch_size=BATCH, seed=0), ae,
                                 torch.optim.Adam(ae.parameters(), 1e-3), {"l1": L1(), "kl": KL(1e-6)}, disc,
                                 torch.optim.Adam(disc.parameters(), 1e-3),
                                 adversarial_warmup_iterations=1, ema_decay=0.9,
                                 train_handlers=[FullStateCheckpointer(ckpt_dir, save_interval_iterations=1)])
        if kill_at is not None:
            def kill(_):
                raise Killed()

            gan.add_event_handler(Events.ITERATION_STARTED(once=kill_at), kill)
        try:
            gan.run()
        except Killed:
            return None
        return {"ae": dist.unwrap(ae).state_dict(), "d": dist.unwrap(disc).state_dict(),
                "ema": gan.ema_model.state_dict(), "d_loss": gan.state.output["d_loss"]}

    straight = gan_run(out_dir / "gan_straight")
    assert gan_run(out_dir / "gan_killed", kill_at=4) is None  # last checkpoint: iteration 3, mid-epoch 2
    resumed = gan_run(out_dir / "gan_killed")
    torch.save({"straight": straight, "resumed": resumed}, out_dir / f"gan_rank{rank}.pt")
    report = {"rank": rank, "world": world, "losses": losses, "seen": seen,
              "main_process": dist.is_main_process(device), "backend": torch.distributed.get_backend()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.finalize()


def rank_batches(rank: int, epoch: int) -> list[list[int]]:
    """The sample indices a rank sees per iteration (DistributedSampler partition, seed 0)."""
    from common.engines import ResumableSampler

    sampler = ResumableSampler(dataset(), shuffle=True, seed=0, num_replicas=2, rank=rank)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i : i + BATCH] for i in range(0, len(idx), BATCH)]


@pytest.mark.slow
def test_two_process_training_matches_one_process_on_the_union(tmp_path):
    from common.engines import AdversarialTrainer
    from common.engines.losses import L1
    from common.io import torch_load

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2] and reports[0]["backend"] == "gloo"
    assert [r["main_process"] for r in reports] == [True, False]
    assert reports[0]["losses"] == reports[1]["losses"]  # logged losses are averaged over ranks
    data = dataset()
    for r in range(2):  # each rank saw its own half of every epoch
        expected = [sum(float(data[i]["image"].sum()) for i in b) for e in (1, 2) for b in rank_batches(r, e)]
        assert reports[r]["seen"] == pytest.approx(expected, rel=1e-5)

    w0, w1 = (torch.load(tmp_path / f"ae_rank{r}.pt", weights_only=True) for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k])

    # one process, same initial weights (rank 0's), on the union of both ranks' batches
    torch.manual_seed(0)
    model = ToyAE()
    union = [
        {"image": torch.stack([data[i]["image"] for i in b0 + b1])}
        for e in (1, 2)
        for b0, b1 in zip(rank_batches(0, e), rank_batches(1, e))
    ]
    single = AdversarialTrainer("cpu", 1, union, model, torch.optim.SGD(model.parameters(), lr=0.5), {"l1": L1()})
    single.run()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, w0[k], atol=1e-6), k
    assert not torch.allclose(model.conv.weight, ToyAE().conv.weight)  # training did move the weights

    # scale factor pooled over ranks' first batches, identical on both ranks
    d0, d1 = (torch.load(tmp_path / f"diff_rank{r}.pt", weights_only=True) for r in range(2))
    torch.manual_seed(0)
    encoder = ToyEncoder()
    first = torch.stack([data[i]["image"] for i in rank_batches(0, 1)[0] + rank_batches(1, 1)[0]])
    with torch.no_grad():
        expected = 1.0 / float(encoder.encode_stage_2_inputs(first).std())
    assert float(d0["scale_factor"]) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(d0["scale_factor"], d1["scale_factor"]) and torch.equal(d0["conv.weight"], d1["conv.weight"])

    g0, g1 = (torch.load(tmp_path / f"gan_rank{r}.pt", weights_only=True) for r in range(2))
    assert g0["straight"]["d_loss"] > 0 and g0["straight"]["d_loss"] == g1["straight"]["d_loss"]
    for part in ("ae", "d", "ema"):  # parameters agree; BatchNorm running stats stay per rank (DDP semantics)
        params = [k for k in g0["straight"][part] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert len(params) > 4
        for k in params:
            assert torch.equal(g0["straight"][part][k], g1["straight"][part][k]), (part, k)
        for g in (g0, g1):  # killed + resumed == straight, on every rank, buffers included
            for k, v in g["straight"][part].items():
                assert torch.equal(v, g["resumed"][part][k]), ("resume", part, k)

    ckpt = torch_load(tmp_path / "ckpt" / "latest.pt")
    assert ckpt["engine"]["iteration"] == EPOCHS * N_SAMPLES // (2 * BATCH)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert not list((tmp_path / "ckpt").glob(".*"))  # no temporary files left behind


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]))
