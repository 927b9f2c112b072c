"""Trainers of common.engines on tiny MONAI networks and random 16^3 volumes (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.handlers import MeanAbsoluteError, ValidationHandler, from_engine
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from common.engines import AdversarialTrainer, DiffusionTrainer, diffusion_target, make_dataloader
from common.engines.losses import KL, L1, SSIM, MaskedL1, Perceptual, Quantization
from common.engines.validation import (
    ReconstructionInferer,
    ReconstructionPrepareBatch,
    SeededEvaluator,
    metric_handler,
    psnr_handler,
    ssim_handler,
)

SHAPE = (16, 16, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_ae(use_checkpoint: bool = False) -> AutoencoderKL:
    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                         num_res_blocks=1, attention_levels=(False, False), norm_num_groups=4,
                         use_checkpoint=use_checkpoint)


def tiny_unet(channels: int = 1) -> DiffusionModelUNet:
    return DiffusionModelUNet(spatial_dims=3, in_channels=channels, out_channels=channels, channels=(8, 8),
                              attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)


def smooth_volumes(n: int, seed: int = 0) -> list[dict]:
    """Blurred random blobs: structured enough for a tiny network to learn within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *SHAPE, generator=g)
    x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)
    x = (x - x.amin(dim=(1, 2, 3, 4), keepdim=True)) / (x.amax(dim=(1, 2, 3, 4), keepdim=True) - x.amin(dim=(1, 2, 3, 4), keepdim=True))
    return [{"image": x[i], "label": (x[i] > 0.5).float()} for i in range(n)]


def ae_trainer(ae, optimizer, epochs=1, data=None, kl_weight=1e-6, losses=None, **kwargs):
    """The stage-1 objective of LDM-3D (L1 + KL) through the shared adversarial trainer."""
    losses = losses or {"l1": L1(), "kl": KL(kl_weight)}
    return AdversarialTrainer("cpu", epochs, data if data is not None else loader(), ae, optimizer, losses, **kwargs)


def loader(n=4, batch_size=2, seed=0):
    return make_dataloader(smooth_volumes(n, seed), batch_size=batch_size, shuffle=True, seed=seed)


def record(trainer, fn):
    """Collect fn(trainer) after every iteration."""
    out = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.append(fn(e)))
    return out


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


# --------------------------------------------------------------------------------------------------------------
def test_autoencoder_loss_falls_and_output_keys():
    torch.manual_seed(0)
    ae = tiny_ae()
    trainer = ae_trainer(ae, torch.optim.Adam(ae.parameters(), 3e-3), 12)
    l1 = record(trainer, lambda e: e.state.output["l1"])
    trainer.run()
    out = trainer.state.output
    assert {"loss", "l1", "kl", "g_adv", "adv_weight", "fm", "d_loss"} <= set(out.keys())
    # what `--tracking mlflow` and StatsHandler read: a plain float
    assert isinstance(out["loss"], float) and from_engine(["loss"], first=True)(out) == out["loss"]
    preds, labels = from_engine(["pred", "label"])(out)  # MONAI metric-handler convention: per-sample lists
    assert len(preds) == 2 and preds[0].shape == (1, *SHAPE) and torch.equal(labels[1], out["image"][1])
    assert out["pred"].shape == out["image"].shape == (2, 1, *SHAPE)
    assert len(l1) == 24
    assert sum(l1[-4:]) / 4 < 0.6 * sum(l1[:4]) / 4, l1


def test_adversarial_steps_start_after_warmup_and_ssim_perceptual_terms():
    torch.manual_seed(0)
    ae, disc = tiny_ae(), PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    calls = []

    def perceptual(pred, target):  # a stand-in network-free perceptual loss, records that it is used
        calls.append(pred.shape)
        return (pred - target).pow(2).mean()

    losses = {"l1": L1(), "kl": KL(1e-6), "perceptual": Perceptual(0.5, perceptual), "ssim": SSIM(0.2)}
    trainer = ae_trainer(ae, torch.optim.Adam(ae.parameters(), 1e-3), 2, losses=losses, discriminator=disc,
                         d_optimizer=torch.optim.Adam(disc.parameters(), 1e-3), adversarial_warmup_iterations=3)
    d_weights = record(trainer, lambda e: flat(disc))
    outs = record(trainer, lambda e: {k: v for k, v in e.state.output.items() if isinstance(v, float)})
    d_before = flat(disc)
    trainer.run()
    assert len(outs) == 4 and len(calls) == 4
    for i in range(3):  # warm-up: discriminator neither used nor trained
        assert outs[i]["g_adv"] == 0.0 and outs[i]["d_loss"] == 0.0
        assert torch.equal(d_weights[i], d_before)
    assert outs[3]["g_adv"] > 0 and outs[3]["d_loss"] > 0
    assert not torch.equal(d_weights[3], d_before)
    o = outs[3]
    assert 0 < o["ssim"] < 2 and o["perceptual"] > 0
    expected = o["l1"] + 1e-6 * o["kl"] + 0.5 * o["perceptual"] + 0.2 * o["ssim"] + 0.01 * o["g_adv"]
    assert math.isclose(o["loss"], expected, rel_tol=1e-5)


def test_gradient_checkpointing_gives_the_same_update():
    weights = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        ae = tiny_ae(use_checkpoint)
        trainer = ae_trainer(ae, torch.optim.SGD(ae.parameters(), 0.1))
        trainer.run()
        weights.append(flat(ae))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def fixed_eval_loss(net, scheduler, data, seed=123):
    """Denoising loss on fixed noise/timesteps: a noise-free measure of training progress."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.stack([d["image"] for d in data])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],), generator=g)
    with torch.no_grad():
        pred = net(scheduler.add_noise(x0, noise, t), t)
    return float(((pred - diffusion_target(scheduler, x0, noise, t)) ** 2).mean())


def test_diffusion_loss_falls():
    torch.manual_seed(0)
    net, sched = tiny_unet(), DDPMScheduler(1000)
    data = smooth_volumes(4)
    trainer = DiffusionTrainer("cpu", 15, make_dataloader(data, batch_size=2, seed=0), net,
                               torch.optim.Adam(net.parameters(), 3e-3), sched)
    before = fixed_eval_loss(net, sched, data)
    trainer.run()
    after = fixed_eval_loss(net, sched, data)
    assert trainer.state.iteration == 30 and isinstance(trainer.state.output["loss"], float)
    assert after < 0.5 * before, (before, after)


def test_target_formulas_known_answers():
    x0, noise = torch.randn(3, 1, 4, 4, 4), torch.randn(3, 1, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    ddpm = DDPMScheduler(1000, prediction_type="v_prediction")
    ab = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    v = diffusion_target(ddpm, x0, noise, t)
    assert torch.allclose(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6)
    noisy = ddpm.add_noise(x0, noise, t)
    assert torch.allclose(ab.sqrt() * noisy - (1 - ab).sqrt() * v, x0, atol=1e-5)  # x0 recovered from v
    assert torch.equal(diffusion_target(DDPMScheduler(1000), x0, noise, t), noise)
    assert torch.equal(diffusion_target(DDPMScheduler(1000, prediction_type="sample"), x0, noise, t), x0)
    rflow = RFlowScheduler(1000, use_discrete_timesteps=False)
    rflow.set_timesteps(10)
    tf = torch.tensor([250.0, 500.0, 1000.0])
    vel = diffusion_target(rflow, x0, noise, tf)
    noisy = rflow.add_noise(x0, noise, tf)
    for i in range(3):  # one Euler step of the scheduler from t to 0 with the exact velocity lands on x0
        nxt, pred_x0 = rflow.step(vel[i : i + 1], tf[i], noisy[i : i + 1], next_timestep=torch.tensor(0))
        assert torch.allclose(nxt, x0[i : i + 1], atol=1e-5) and torch.allclose(pred_x0, x0[i : i + 1], atol=1e-5)


class Spy(torch.nn.Module):
    """Tiny conditional denoiser that records its inputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 1, 3, padding=1)
        self.null = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t, condition=None, drop_condition=None):
        self.calls.append({"x": x.detach().clone(), "t": t.clone(), "cond": condition, "drop": drop_condition})
        if drop_condition is not None:
            condition = torch.where(drop_condition.view(-1, 1, 1, 1, 1), self.null.view(1, 1, 1, 1, 1).expand_as(condition), condition)
        return self.conv(torch.cat([x, condition], 1))


@pytest.mark.parametrize("kind", ["v_prediction", "rflow"])
def test_trainer_regresses_the_right_target(kind):
    torch.manual_seed(0)
    net = Spy()
    sched = RFlowScheduler(1000, use_discrete_timesteps=False) if kind == "rflow" else DDPMScheduler(1000, prediction_type=kind)
    trainer = DiffusionTrainer("cpu", 1, loader(), net, torch.optim.SGD(net.parameters(), 0.0), sched,
                               condition_key="label", condition_dropout=0.5)
    trainer.run()
    out, call = trainer.state.output, net.calls[-1]
    x0, noisy, t, target = out["image"], call["x"], call["t"], out["target"]
    if kind == "rflow":
        s = (t.float() / 1000).view(-1, 1, 1, 1, 1)
        assert t.dtype.is_floating_point
        assert torch.allclose(noisy + s * target, x0, atol=1e-5)
    else:
        ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        assert torch.allclose(ab.sqrt() * noisy - (1 - ab).sqrt() * target, x0, atol=1e-5)
    assert torch.allclose(out["loss"] * torch.ones(()), ((out["pred"] - target) ** 2).mean(), atol=1e-6)
    assert call["cond"] is not None and call["drop"].dtype == torch.bool and call["drop"].shape == (2,)


def test_condition_dropout_rate():
    torch.manual_seed(0)
    net = Spy()
    data = [{"image": torch.rand(1, 4, 4, 4), "label": torch.ones(1, 4, 4, 4)} for _ in range(64)]
    trainer = DiffusionTrainer("cpu", 4, make_dataloader(data, batch_size=16), net, torch.optim.SGD(net.parameters(), 0.0),
                               DDPMScheduler(100), condition_key="label", condition_dropout=0.3)
    trainer.run()
    drops = torch.cat([c["drop"] for c in net.calls]).float()
    assert drops.numel() == 256 and 0.2 < drops.mean() < 0.4


def test_ema_follows_the_decay_formula():
    torch.manual_seed(0)
    net = tiny_unet()
    decay = 0.8
    trainer = DiffusionTrainer("cpu", 2, loader(), net, torch.optim.Adam(net.parameters(), 1e-2), DDPMScheduler(1000),
                               ema_decay=decay)
    ema = [flat(trainer.ema_model)]
    raw = [flat(net)]
    record(trainer, lambda e: (raw.append(flat(net)), ema.append(flat(e.ema_model))))
    trainer.run()
    assert len(ema) == 5 and torch.equal(ema[0], raw[0])
    for k in range(1, 5):
        assert torch.allclose(ema[k], decay * ema[k - 1] + (1 - decay) * raw[k], atol=1e-6)
    assert not torch.allclose(ema[-1], raw[-1])
    assert "ema" in trainer.checkpoint_objects()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_on_cpu(amp):
    torch.manual_seed(0)
    net = tiny_unet()
    before = flat(net)
    trainer = DiffusionTrainer("cpu", 1, loader(), net, torch.optim.Adam(net.parameters(), 1e-3), DDPMScheduler(1000), amp=amp)
    trainer.run()
    assert trainer.state.output["pred"].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert math.isfinite(trainer.state.output["loss"])
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert not torch.equal(flat(net), before)


def test_grad_clipping_bounds_the_norm():
    torch.manual_seed(0)
    ae = tiny_ae()
    clip = 1e-3
    trainer = ae_trainer(ae, torch.optim.SGD(ae.parameters(), 0.0), grad_clip_norm=clip)
    trainer.run()
    grads = [p.grad for p in ae.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert trainer.state.output["grad_norm"] > 10 * clip  # clipping really happened
    assert total <= clip * (1 + 1e-4)


class DeterministicEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 2, stride=2)

    def encode_stage_2_inputs(self, x):
        return self.conv(x) * 3.0


def test_latent_scale_factor_set_once_and_stored():
    torch.manual_seed(0)
    enc, net = DeterministicEncoder(), tiny_unet(channels=2)
    data = smooth_volumes(4)
    dl = make_dataloader(data, batch_size=2, seed=0)
    probe = make_dataloader(data, batch_size=2, seed=0)
    probe.sampler.set_epoch(1)  # ignite epochs count from 1
    first = next(iter(probe))  # what the trainer sees first
    trainer = DiffusionTrainer("cpu", 2, dl, net, torch.optim.Adam(net.parameters(), 1e-3), DDPMScheduler(1000),
                               autoencoder=enc)
    assert torch.isnan(net.scale_factor)
    values = record(trainer, lambda e: float(net.scale_factor))
    trainer.run()
    with torch.no_grad():
        expected = 1.0 / float(enc.encode_stage_2_inputs(first["image"]).std())
    assert values[0] == pytest.approx(expected, rel=1e-5)
    assert values == [values[0]] * 4
    assert "scale_factor" in net.state_dict() and float(net.state_dict()["scale_factor"]) == values[0]
    assert not any(p.requires_grad for p in enc.parameters())
    # a preset factor is kept
    net2 = tiny_unet(channels=2)
    net2.register_buffer("scale_factor", torch.tensor(0.5))
    DiffusionTrainer("cpu", 1, dl, net2, torch.optim.Adam(net2.parameters(), 1e-3), DDPMScheduler(1000), autoencoder=enc).run()
    assert float(net2.scale_factor) == 0.5


def test_augmentation_depends_only_on_seed_epoch_and_index():
    from monai.data import Dataset
    from monai.transforms import RandGaussianNoised

    items = [{"image": torch.zeros(1, 4, 4, 4), "id": i} for i in range(6)]

    def epoch_samples(epoch, batch_size, num_workers=0):
        dl = make_dataloader(Dataset(items, RandGaussianNoised(keys="image", prob=1.0)), batch_size=batch_size,
                             seed=1, num_workers=num_workers)
        dl.sampler.set_epoch(epoch)
        return {int(i): img for b in dl for i, img in zip(b["id"], b["image"])}

    a, b, c = epoch_samples(1, 2), epoch_samples(1, 3, num_workers=2), epoch_samples(2, 2)
    assert set(a) == set(range(6))
    for i in range(6):
        assert torch.equal(a[i], b[i])  # batch size / workers do not matter
        assert not torch.equal(a[i], c[i])  # a new epoch gives new augmentations
    assert not torch.equal(a[0], a[1])


def test_bad_inputs_fail_clearly():
    net = tiny_unet()
    with pytest.raises(ValueError, match="amp"):
        DiffusionTrainer("cpu", 1, loader(), net, torch.optim.SGD(net.parameters(), 0.1), DDPMScheduler(10), amp="fp8")
    with pytest.raises(ValueError, match="condition_key"):
        DiffusionTrainer("cpu", 1, loader(), net, torch.optim.SGD(net.parameters(), 0.1), DDPMScheduler(10), condition_dropout=0.1)
    trainer = DiffusionTrainer("cpu", 1, make_dataloader([{"img": torch.zeros(1, 4, 4, 4)}]), net,
                               torch.optim.SGD(net.parameters(), 0.1), DDPMScheduler(10))
    with pytest.raises(KeyError, match="'image'"):
        trainer.run()
    with pytest.raises(ValueError, match="empty"):
        make_dataloader([])


class Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w, torch.zeros_like(x), torch.ones_like(x)


def test_validation_every_interval_with_seeded_evaluator():
    torch.manual_seed(0)
    data = smooth_volumes(4)
    net = Identity()
    evaluator = SeededEvaluator(
        device=torch.device("cpu"), val_data_loader=make_dataloader(data, batch_size=2, shuffle=False), network=net,
        prepare_batch=ReconstructionPrepareBatch("image"), inferer=ReconstructionInferer(),
        key_val_metric={"val_ssim": ssim_handler()},
        additional_metrics={"val_psnr": psnr_handler(),
                            "val_mae": MeanAbsoluteError(output_transform=from_engine(["pred", "label"])),
                            # any per-sample function plugs in
                            "val_maxdiff": metric_handler(lambda p, t: (p - t).abs().flatten(1).amax(1))},
        seed=0,
    )
    trainer = ae_trainer(net, torch.optim.SGD(net.parameters(), 0.0), 4,
                         train_handlers=[ValidationHandler(interval=2, validator=evaluator, epoch_level=True)])
    runs = []
    evaluator.add_event_handler(Events.COMPLETED, lambda e: runs.append(dict(e.state.metrics)))
    trainer.run()
    assert len(runs) == 2  # epochs 2 and 4
    assert runs[0]["val_ssim"] == pytest.approx(1.0, abs=1e-4) and runs[0]["val_mae"] == pytest.approx(0.0, abs=1e-7)
    assert runs[0]["val_psnr"] > 60
    # an imperfect reconstruction scores lower, and the evaluator leaves the training RNG alone
    with torch.no_grad():
        net.w.fill_(0.5)
    state = torch.get_rng_state()
    evaluator.run()
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluator.state.metrics["val_ssim"] < 0.99 and evaluator.state.metrics["val_mae"] > 0.05
    expected_maxdiff = sum(float(d["image"].max()) * 0.5 for d in data) / len(data)
    assert evaluator.state.metrics["val_maxdiff"] == pytest.approx(expected_maxdiff, rel=1e-5)


def test_trainer_from_a_bundle_config(tmp_path):
    """The way the bundles use it: MONAI ConfigParser instantiates trainer, handlers and validation."""
    from monai.bundle import ConfigParser

    config = {
        "imports": ["$import torch", "$import common", "$import common.engines", "$import common.engines.validation as V"],
        "device": "$torch.device('cpu')",
        "data": "$[{'image': torch.rand(1, 16, 16, 16)} for _ in range(4)]",
        "autoencoder": {"_target_": "AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                        "channels": [8, 8], "latent_channels": 2, "num_res_blocks": 1,
                        "attention_levels": [False, False], "norm_num_groups": 4},
        "discriminator": {"_target_": "PatchDiscriminator", "spatial_dims": 3, "num_layers_d": 2, "channels": 8,
                          "in_channels": 1, "out_channels": 1},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@autoencoder.parameters()", "lr": 1e-3},
        "d_optimizer": {"_target_": "torch.optim.Adam", "params": "$@discriminator.parameters()", "lr": 1e-3},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": "@optimizer", "step_size": 1},
        "val_interval": 1,
        "validate": {
            "evaluator": {"_target_": "common.engines.validation.SeededEvaluator", "device": "@device",
                          "val_data_loader": "$common.engines.make_dataloader(@data, batch_size=2, shuffle=False)",
                          "network": "@autoencoder", "prepare_batch": "$V.ReconstructionPrepareBatch('image')",
                          "inferer": "$V.ReconstructionInferer()",
                          "key_val_metric": {"val_ssim": "$V.ssim_handler()"}},
        },
        "train": {
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
                {"_target_": "common.engines.FullStateCheckpointer", "save_dir": str(tmp_path / "ckpt"),
                 "save_interval_iterations": 1, "objects": {"lr_scheduler": "@lr_scheduler"}},
                {"_target_": "common.engines.WeightsExporter", "path": str(tmp_path / "models" / "model.pt"),
                 "key": "ema"},
            ],
            "trainer": {"_target_": "common.engines.AdversarialTrainer", "device": "@device", "max_epochs": 2,
                        "train_data_loader": "$common.engines.make_dataloader(@data, batch_size=2, seed=0)",
                        "generator": "@autoencoder", "optimizer": "@optimizer",
                        "losses": {"l1": {"_target_": "common.engines.losses.L1"},
                                   "kl": {"_target_": "common.engines.losses.KL", "weight": 1e-6}},
                        "discriminator": "@discriminator", "d_optimizer": "@d_optimizer",
                        "adversarial_warmup_iterations": 2, "ema_decay": 0.9, "train_handlers": "@train#handlers"},
        },
        "run": ["$@train#trainer.run()"],
    }
    parser = ConfigParser(config)
    parser.parse()
    parser.get_parsed_content("run")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert trainer.state.iteration == 4 and 0 < evaluator.state.metrics["val_ssim"] <= 1
    exported = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    for k, v in trainer.ema_model.state_dict().items():
        assert torch.equal(exported[k], v)
    ckpt = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    assert ckpt["objects"]["lr_scheduler"]["last_epoch"] == 2 and ckpt["engine"]["iteration"] == 4


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_adversarial_autoencoder_amp_on_cuda(amp):
    torch.manual_seed(0)
    ae = tiny_ae().cuda()
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1).cuda()
    trainer = AdversarialTrainer("cuda", 2, loader(), ae, torch.optim.Adam(ae.parameters(), 1e-3),
                                 {"l1": L1(), "kl": KL(1e-6)}, disc, torch.optim.Adam(disc.parameters(), 1e-3),
                                 adversarial_warmup_iterations=1, amp=amp, grad_clip_norm=1.0, ema_decay=0.9)
    trainer.run()
    out = trainer.state.output
    assert out["pred"].is_cuda and math.isfinite(out["loss"]) and out["d_loss"] > 0
    assert trainer.g_scaler.is_enabled() == (amp == "fp16")


def test_vq_autoencoder_with_hinge_discriminator():
    from monai.networks.nets import VQVAE

    torch.manual_seed(0)
    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), num_res_channels=8, num_res_layers=1,
               downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)), upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
               num_embeddings=16, embedding_dim=4)
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    trainer = AdversarialTrainer("cpu", 2, loader(), vq, torch.optim.Adam(vq.parameters(), 1e-3),
                                 {"l1": L1(), "vq": Quantization(0.25)}, disc, torch.optim.Adam(disc.parameters(), 1e-3),
                                 adversarial_criterion="hinge", adversarial_warmup_iterations=1)
    outs = record(trainer, lambda e: {k: v for k, v in e.state.output.items() if isinstance(v, float)})
    trainer.run()
    o = outs[-1]
    assert "kl" not in o and o["vq"] > 0 and o["d_loss"] > 0
    assert math.isclose(o["loss"], o["l1"] + 0.25 * o["vq"] + 0.01 * o["g_adv"], rel_tol=1e-5)


# ---------------------------------------------------------------------------------------- adversarial trainer
class TinyTranslator(torch.nn.Module):
    """A pix2pix-like image-to-image generator: source contrast -> target contrast."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def translation_slices(n=8, seed=0):
    """2-D slices: target = smooth function of the source, brighter inside a 'lesion' mask."""
    g = torch.Generator().manual_seed(seed)
    src = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 24, 24, generator=g), 5, stride=1, padding=2)
    lesion = torch.zeros(n, 1, 24, 24)
    lesion[..., 8:14, 9:15] = 1.0
    tgt = 1.0 - src + 0.8 * lesion
    return [{"t2w": src[i], "t2f": tgt[i], "label": lesion[i]} for i in range(n)]


def test_pix2pix_like_generator_with_lesion_mask_term_trains_through_the_same_trainer():
    torch.manual_seed(0)
    gen = TinyTranslator()
    disc = PatchDiscriminator(spatial_dims=2, num_layers_d=2, channels=8, in_channels=2, out_channels=1)
    losses = {"l1": L1(10.0), "lesion": MaskedL1(10.0, mask_key="label")}
    seen = []

    class Recording(torch.nn.Module):  # sees what the discriminator sees
        def __init__(self, d):
            super().__init__()
            self.d = d

        def forward(self, x):
            seen.append(x.shape[1])
            return self.d(x)

    data = make_dataloader(translation_slices(), batch_size=4, seed=0)
    trainer = AdversarialTrainer("cpu", 30, data, gen, torch.optim.Adam(gen.parameters(), 3e-3), losses,
                                 Recording(disc), torch.optim.Adam(disc.parameters(), 1e-3), adversarial_weight=0.1,
                                 adversarial_warmup_iterations=2, input_key="t2w", target_key="t2f",
                                 condition_key="t2w", d_steps=2)
    outs = record(trainer, lambda e: {k: v for k, v in e.state.output.items() if isinstance(v, float)})
    trainer.run()
    first, last = outs[0], outs[-1]
    assert last["lesion"] < 0.6 * first["lesion"] and last["l1"] < 0.6 * first["l1"]
    assert set(seen) == {2}  # the discriminator sees cat(source, image), as pix2pix's conditional D
    # per iteration after the warm-up: one D call in the G step, two D steps on (fake, real)
    assert len(seen) == (60 - 2) * (1 + 2 * 2)
    out = trainer.state.output
    assert math.isclose(last["loss"], 10 * last["l1"] + 10 * last["lesion"] + last["adv_weight"] * last["g_adv"],
                        rel_tol=1e-5)
    assert out["pred"].shape == out["image"].shape == (4, 1, 24, 24)


def test_masked_l1_known_answer_and_normalisation():
    pred = torch.zeros(1, 1, 4, 4)
    target = torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 3.0  # any label > 0 counts as lesion
    batch = {"label": mask}
    assert float(MaskedL1(mask_key="label")(pred, target, {}, batch)) == pytest.approx(4 / 16)
    assert float(MaskedL1(mask_key="label", normalise="mask")(pred, target, {}, batch)) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="no 'lesion' mask"):
        MaskedL1(mask_key="lesion")(pred, target, {}, batch)


def test_adaptive_weight_is_the_gradient_norm_ratio_and_feature_matching_is_reported():
    torch.manual_seed(0)
    ae = tiny_ae()
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    last = ae.decoder.blocks[-1].conv.weight
    captured = {}
    trainer = ae_trainer(ae, torch.optim.SGD(ae.parameters(), 0.0), 1, losses={"l1": L1()}, discriminator=disc,
                         d_optimizer=torch.optim.SGD(disc.parameters(), 0.0), adversarial_weight=0.5,
                         adaptive_weight=True, last_layer=last, feature_matching_weight=1.0,
                         adversarial_criterion="hinge")
    original = trainer._adaptive

    def spy(rec, g_adv):
        lam = original(rec, g_adv)
        r = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
        a = torch.autograd.grad(g_adv, last, retain_graph=True)[0].norm()
        captured["expected"] = float((r / (a + 1e-4)).clamp(0, 1e4))
        captured["lam"] = float(lam)
        return lam

    trainer._adaptive = spy
    trainer.run()
    out = trainer.state.output
    assert captured["lam"] == pytest.approx(captured["expected"], rel=1e-5) and captured["lam"] > 0
    assert out["adv_weight"] == pytest.approx(0.5 * captured["lam"], rel=1e-5)
    assert out["fm"] > 0
    assert math.isclose(out["loss"], out["l1"] + out["adv_weight"] * out["g_adv"] + out["fm"], rel_tol=1e-4)
    with pytest.raises(ValueError, match="last_layer"):
        ae_trainer(ae, torch.optim.SGD(ae.parameters(), 0.0), losses={"l1": L1()}, adaptive_weight=True)
    with pytest.raises(ValueError, match="reserved"):
        ae_trainer(ae, torch.optim.SGD(ae.parameters(), 0.0), losses={"loss": L1()})


def test_validation_images_put_real_above_generated_per_channel(tmp_path):
    from common.engines.validation import ValidationImages

    real = torch.zeros(2, 3, 4, 5)
    real[0, ..., 2] = torch.arange(12.0).view(3, 4)  # channel 0, middle slice: a ramp 0..11
    real[1, ..., 2] = 5.0
    real[1, 0, 0, 2] = 1.0
    generated = real * 0.5
    handler = ValidationImages(str(tmp_path))
    picture = handler.picture([{"label": real, "pred": generated}])
    assert picture.shape == (1, 6, 8)  # 2 rows (real, generated) x 2 channels of 3x4
    torch.testing.assert_close(picture[0, :3, :4], torch.arange(12.0).view(3, 4) / 11)
    torch.testing.assert_close(picture[0, 3:, :4], (torch.arange(12.0).view(3, 4) * 0.5 / 11))  # real's range
    assert picture[0, :3, 4:].max() == 1 and picture[0, 0, 4] == 0
    batched = handler.picture({"label": real[None], "pred": generated[None]})
    torch.testing.assert_close(batched, picture)
