"""A run killed at any point and resumed from `latest.pt` ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from common.engines import AdversarialTrainer, DiffusionTrainer, FullStateCheckpointer, load_weights, make_dataloader
from common.engines.losses import KL, L1, SSIM
from common.io import DataError, torch_load, torch_save


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(Exception):
    """Stands in for SIGKILL: nothing after it runs (no COMPLETED handlers, no final save)."""


def data(n=6):
    """Volumes with random augmentation (flip + noise): resume must replay it exactly too."""
    from monai.data import Dataset
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.avg_pool3d(torch.rand(n, 1, 16, 16, 16, generator=g), 3, stride=1, padding=1)
    items = [{"image": x[i], "label": (x[i] > 0.5).float()} for i in range(n)]
    augment = Compose([RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                       RandGaussianNoised(keys="image", prob=1.0, std=0.05)])
    return Dataset(items, transform=augment)


def tiny_ae():
    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8), latent_channels=2,
                         num_res_blocks=1, attention_levels=(False, False), norm_num_groups=4)


def build_autoencoder(init_seed, ckpt_dir):
    torch.manual_seed(init_seed)
    ae = tiny_ae()
    disc = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=8, in_channels=1, out_channels=1)
    opt, d_opt = torch.optim.Adam(ae.parameters(), 2e-3), torch.optim.Adam(disc.parameters(), 2e-3)
    lr_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    handlers = [LrScheduleHandler(lr_sched, print_lr=False)]
    if ckpt_dir is not None:
        handlers.append(FullStateCheckpointer(ckpt_dir, save_interval_iterations=1, objects={"lr_scheduler": lr_sched}))
    trainer = AdversarialTrainer(
        "cpu", 3, make_dataloader(data(), batch_size=2, shuffle=True, seed=3), ae, opt,
        {"l1": L1(), "kl": KL(1e-6), "ssim": SSIM(0.1)}, disc, d_opt,
        adversarial_warmup_iterations=4, ema_decay=0.9, train_handlers=handlers,
    )
    return trainer, {"lr_scheduler": lr_sched}


class CondNet(torch.nn.Module):
    """Latent denoiser conditioned on a mask pooled to the latent grid, with a learned null condition."""

    def __init__(self):
        super().__init__()
        self.unet = DiffusionModelUNet(spatial_dims=3, in_channels=3, out_channels=2, channels=(8, 8),
                                       attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)
        self.null = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("scale_factor", torch.tensor(float("nan")))

    def forward(self, x, t, condition=None, drop_condition=None):
        cond = torch.nn.functional.avg_pool3d(condition, 2)
        if drop_condition is not None:
            cond = torch.where(drop_condition.view(-1, 1, 1, 1, 1), self.null.view(1, 1, 1, 1, 1).expand_as(cond), cond)
        return self.unet(torch.cat([x, cond], 1), t)


def build_diffusion(init_seed, ckpt_dir, scheduler="rflow"):
    torch.manual_seed(init_seed)
    ae, net = tiny_ae(), CondNet()  # the random (sampled) latents exercise the RNG restore
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    sched = RFlowScheduler(1000, use_discrete_timesteps=False) if scheduler == "rflow" else DDPMScheduler(1000)
    handlers = [FullStateCheckpointer(ckpt_dir, save_interval_iterations=1)] if ckpt_dir is not None else []
    trainer = DiffusionTrainer(
        "cpu", 3, make_dataloader(data(), batch_size=2, shuffle=True, seed=5), net, opt, sched, autoencoder=ae,
        condition_key="label", condition_dropout=0.3, ema_decay=0.8, train_handlers=handlers,
    )
    return trainer, {}


def build_diffusion_dali(init_seed, ckpt_dir):
    """The diffusion run fed by the DALI loader (flips in the pipeline, parameters per (seed, epoch, index))."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (requirements-dev.txt)")
    from monai.transforms import Compose, EnsureTyped, RandFlipd

    from common.engines import DaliLoader

    torch.manual_seed(init_seed)
    ae, net = tiny_ae(), CondNet()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    dataset = data()
    dataset.transform = Compose([RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                                 EnsureTyped(keys=["image", "label"])])
    cache = (ckpt_dir or DALI_CACHE).parent / "dali-cache"  # the same arrays for the reference and the resumed run
    loader = DaliLoader(make_dataloader(dataset, batch_size=2, shuffle=True, seed=5), cache_dir=str(cache))
    handlers = [FullStateCheckpointer(ckpt_dir, save_interval_iterations=1)] if ckpt_dir is not None else []
    trainer = DiffusionTrainer("cpu", 3, loader, net, opt, RFlowScheduler(1000, use_discrete_timesteps=False),
                               autoencoder=ae, condition_key="label", condition_dropout=0.3, ema_decay=0.8,
                               train_handlers=handlers)
    return trainer, {}


DALI_CACHE = None  # set per test (tmp_path) before the reference run


def final_state(trainer, extra):
    objects = {**trainer.checkpoint_objects(), **extra}
    return {name: obj.state_dict() for name, obj in objects.items()}


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.parametrize(
    "build,kill_event,kill_at,resume_at",
    [
        (build_autoencoder, Events.ITERATION_COMPLETED, 5, 4),  # killed mid-epoch, before the save of iteration 5
        (build_autoencoder, Events.ITERATION_STARTED, 7, 6),  # killed right after an epoch-end checkpoint
        (build_diffusion, Events.ITERATION_COMPLETED, 2, 1),
        (build_diffusion, Events.ITERATION_STARTED, 4, 3),
        (build_diffusion_dali, Events.ITERATION_COMPLETED, 5, 4),
    ],
)
def test_killed_run_resumes_to_identical_weights(tmp_path, build, kill_event, kill_at, resume_at):
    global DALI_CACHE
    DALI_CACHE = tmp_path / "ckpt"
    reference, extra = build(0, None)
    reference.run()
    expected = final_state(reference, extra)
    assert reference.state.iteration == 9

    ckpt_dir = tmp_path / "ckpt"
    first, _ = build(0, ckpt_dir)

    def kill(_):
        raise Killed()

    first.add_event_handler(kill_event(once=kill_at), kill)
    with pytest.raises(Killed):
        first.run()
    saved = torch_load(ckpt_dir / "latest.pt")
    assert saved["engine"]["iteration"] == resume_at

    resumed, extra2 = build(1, ckpt_dir)  # different initial weights and RNG: everything must come from the file
    seen = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.iteration))
    resumed.run()
    assert seen == list(range(resume_at + 1, 10))
    assert resumed.state.epoch == 3
    assert_same(final_state(resumed, extra2), expected)


def test_scale_factor_and_ema_travel_with_the_checkpoint(tmp_path):
    trainer, _ = build_diffusion(0, tmp_path)
    trainer.run()
    net = CondNet()
    load_weights(net, tmp_path / "latest.pt", key="network")
    assert torch.isfinite(net.scale_factor) and float(net.scale_factor) == float(trainer.network.scale_factor)
    ema = CondNet()
    load_weights(ema, tmp_path / "latest.pt", key="ema")
    for a, b in zip(ema.parameters(), trainer.ema_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(DataError, match="no 'generator' entry"):
        load_weights(net, tmp_path / "latest.pt", key="generator")
    # weights of another network: one short message naming the file and what differs, nothing loaded
    other = CondNet()
    other.unet = DiffusionModelUNet(spatial_dims=3, in_channels=3, out_channels=2, channels=(16, 16),
                                    attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)
    before = {k: v.detach().clone() for k, v in other.named_parameters()}
    with pytest.raises(DataError) as info:
        load_weights(other, tmp_path / "latest.pt", key="network", hint="add configs/demo.json")
    message = str(info.value)
    assert "latest.pt" in message and "another shape" in message and "add configs/demo.json" in message
    assert len(message) < 400 and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in other.named_parameters())
    with pytest.raises(DataError, match="not found.*train it"):
        load_weights(other, tmp_path / "nothing.pt", hint="train it")


def test_resuming_from_a_foreign_file_names_the_file(tmp_path):
    bad = tmp_path / "weights_only.pt"
    torch_save({"conv.weight": torch.zeros(1)}, bad)
    trainer, _ = build_autoencoder(0, None)
    FullStateCheckpointer(tmp_path / "out", resume=bad).attach(trainer)
    with pytest.raises(DataError, match="weights_only.pt.*not a full-state"):
        trainer.run()
    trainer2, _ = build_autoencoder(0, None)
    FullStateCheckpointer(tmp_path / "out", resume=tmp_path / "missing.pt").attach(trainer2)
    with pytest.raises(DataError, match="missing.pt.*does not exist"):
        trainer2.run()


def test_a_weights_card_that_disagrees_with_the_config_is_refused_by_name(tmp_path):
    """The card beside a weight file (what it was trained as) is compared with the config's values before any
    tensor is read; an agreeing card, or none, loads as usual."""
    from common.engines import WeightsCard, write_card
    from common.io import torch_save

    net = CondNet()
    path = torch_save(net.state_dict(), tmp_path / "model.pt")
    card = {"contrasts": ["t1n", "t2f"], "sizes": {"base": 16, "mult": (1, 2)}, "condition_scheme": "brats2023"}
    WeightsCard(path, card).write()
    assert json.loads((tmp_path / "model.json").read_text())["sizes"] == {"base": 16, "mult": [1, 2]}
    load_weights(CondNet(), path, expect=card)  # tuples and lists compare equal
    load_weights(CondNet(), path, expect={**card, "not_in_the_card": 3})  # only what the card records counts
    with pytest.raises(DataError) as info:
        load_weights(CondNet(), path, expect={**card, "sizes": {"base": 32, "mult": [1, 2]},
                                              "condition_scheme": "brats2024"}, hint="add configs/demo.json")
    message = str(info.value)
    assert message.startswith(str(path)) and "model.json" in message and "add configs/demo.json" in message
    assert "sizes.base 16 (config: 32)" in message and "condition_scheme brats2023 (config: brats2024)" in message
    write_card(tmp_path / "other.pt", card)
    torch_save(net.state_dict(), tmp_path / "other.pt")
    (tmp_path / "other.json").unlink()
    load_weights(CondNet(), tmp_path / "other.pt", expect={"contrasts": ["t1c"]})  # no card: shapes decide
    # an on/off flag set on the command line reaches the card as text ("--flag true"): recorded as the bool
    write_card(tmp_path / "flag.pt", {"class_on_every_token": "true", "gradient_checkpointing": "False"})
    torch_save(net.state_dict(), tmp_path / "flag.pt")
    assert json.loads((tmp_path / "flag.json").read_text())["class_on_every_token"] is True
    load_weights(CondNet(), tmp_path / "flag.pt",
                 expect={"class_on_every_token": True, "gradient_checkpointing": "false"})
    with pytest.raises(DataError, match="class_on_every_token True \\(config: False\\)"):
        load_weights(CondNet(), tmp_path / "flag.pt", expect={"class_on_every_token": "false"})


def test_resume_as_the_bundle_cli_passes_it_text_false_starts_over(tmp_path):
    """``--resume false`` reaches the config as the text "false": it must start over, not look for a file."""
    trainer, _ = build_autoencoder(0, tmp_path)
    trainer.run()
    assert (tmp_path / "latest.pt").exists()
    for text, first_iteration in (("false", 1), ("False", 1), ("true", 10), ("1", 10)):
        again, _ = build_autoencoder(0, None)
        checkpointer = FullStateCheckpointer(tmp_path, resume=text)
        checkpointer.attach(again)
        seen = []
        again.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.iteration))
        again.run()
        assert (seen[:1] or [10]) == [first_iteration], text
        assert checkpointer.loaded_from == (None if first_iteration == 1 else tmp_path / "latest.pt")
