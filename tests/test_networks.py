"""LDM-3D networks: paper-size shapes (on the meta device: no compute), conditioning, sampling, perceptual loss."""

from __future__ import annotations

import pytest
import torch

from common.io import DataError
from common.networks import (
    MaskConditionedSampler,
    MaskConditioner,
    build_autoencoder,
    build_ldm,
    build_perceptual_loss,
    make_sampling_scheduler,
)


def test_paper_size_autoencoder_maps_4x128x128x64_to_8x32x32x16_and_back():
    with torch.device("meta"):
        ae = build_autoencoder()  # paper defaults
        z = ae.encode_stage_2_inputs(torch.empty(1, 4, 128, 128, 64))
        assert tuple(z.shape) == (1, 8, 32, 32, 16)
        assert tuple(ae.decode_stage_2_outputs(z).shape) == (1, 4, 128, 128, 64)


@pytest.mark.parametrize("base", [256, 352])
def test_paper_size_unet_accepts_conditioned_latent(base):
    with torch.device("meta"):
        ldm = build_ldm(build_autoencoder(), base_channels=base)
        assert ldm.unet.block_out_channels[0] == base
        assert ldm.unet.conv_in.conv.in_channels == 8 + 8  # latent + mask features concatenated
        out = ldm(
            torch.empty(2, 8, 32, 32, 16),
            torch.zeros(2, dtype=torch.long),
            condition=torch.empty(2, 1, 128, 128, 64),
            drop_condition=torch.tensor([True, False]),
        )
        assert tuple(out.shape) == (2, 8, 32, 32, 16)


def test_conditioner_label_map_equals_one_hot_and_drop_uses_null():
    torch.manual_seed(0)
    cond = MaskConditioner(labels=(1, 2, 3), channels=(8, 8), out_channels=4, cross_attention_dim=16,
                           token_grid=(2, 2, 2), norm_num_groups=4)
    with torch.no_grad():
        cond.null_features.copy_(torch.arange(4.0))
    mask = torch.randint(0, 4, (2, 1, 16, 16, 8)).float()
    one_hot = torch.cat([(mask == v) for v in (1, 2, 3)], 1).float()
    f1, t1 = cond(mask)
    f2, t2 = cond(one_hot)
    assert torch.allclose(f1, f2) and torch.allclose(t1, t2)
    assert f1.shape == (2, 4, 4, 4, 2) and t1.shape == (2, 8, 16)  # 4x down; token count = prod(token_grid)
    fd, td = cond(mask, drop_condition=torch.tensor([True, False]))
    assert torch.allclose(fd[0], torch.arange(4.0).view(4, 1, 1, 1).expand(4, 4, 4, 2))
    assert torch.allclose(td[0], cond.null_tokens)
    assert torch.allclose(fd[1], f1[1]) and torch.allclose(td[1], t1[1])
    _, tokens_big = cond(torch.zeros(1, 1, 32, 32, 16))
    assert tokens_big.shape[1] == 8  # the null condition fits any volume size


def _tiny_ldm():
    torch.manual_seed(0)
    ae = build_autoencoder(channels=(4, 8, 8), latent_channels=3, num_res_blocks=1, norm_num_groups=4)
    ldm = build_ldm(ae, latent_channels=3, base_channels=8, channel_mult=(1, 1), attention_levels=(False, True),
                    num_res_blocks=1, num_head_channels=8, cross_attention_dim=8, norm_num_groups=4,
                    conditioner_channels=(4, 4), condition_channels=2, token_grid=(2, 2, 1))
    with torch.no_grad():  # MONAI zero-initialises the UNet's last conv: give it weights so outputs depend on inputs
        for p in ldm.unet.out.parameters():
            p.normal_(0.0, 0.2)
    return ldm.eval()


def _mask():
    mask = torch.zeros(1, 1, 16, 16, 8)
    mask[..., 4:9, 5:10, 2:6] = 2
    mask[..., 5:7, 6:8, 3:5] = 3
    return mask


def test_ldm_refuses_to_decode_without_scale_factor():
    ldm = _tiny_ldm()
    with pytest.raises(RuntimeError, match="scale_factor"):
        ldm.decode(torch.zeros(1, 3, 4, 4, 2))
    assert "scale_factor" in ldm.state_dict()  # stored with the weights
    assert all(not n.startswith("autoencoder.") for n, p in ldm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("sampler,steps", [("ddim", 3), ("rflow", 3), ("ddpm", 8)])
def test_sampler_seeds_are_per_sample_and_batch_independent(sampler, steps):
    ldm = _tiny_ldm()
    ldm.scale_factor.fill_(1.0)
    sched = make_sampling_scheduler(sampler, num_train_timesteps=8)
    kw = dict(num_inference_steps=steps, num_samples=2, seed=5, progress=False)
    together = MaskConditionedSampler(sched, batch_size=2, **kw)(_mask(), ldm)
    alone = MaskConditionedSampler(sched, batch_size=1, **kw)(_mask(), ldm)
    assert together.shape == (2, 4, 16, 16, 8)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1])  # different seeds, different samples
    again = MaskConditionedSampler(sched, seeds=[6], num_inference_steps=steps, progress=False)(_mask(), ldm)
    assert torch.allclose(again[0], together[1], atol=1e-5)  # seed 6 was sample 1


def test_guidance_changes_samples_and_ddpm_needs_all_steps():
    ldm = _tiny_ldm()
    ldm.scale_factor.fill_(1.0)
    with torch.no_grad():  # make the null condition differ from the mask's
        ldm.conditioner.null_features.fill_(3.0)
    sched = make_sampling_scheduler("ddim", num_train_timesteps=8)
    plain = MaskConditionedSampler(sched, num_inference_steps=2, progress=False)(_mask(), ldm)
    guided = MaskConditionedSampler(sched, num_inference_steps=2, guidance_scale=3.0, progress=False)(_mask(), ldm)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="ddim"):
        MaskConditionedSampler(make_sampling_scheduler("ddpm", num_train_timesteps=20), num_inference_steps=5)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampling_scheduler("euler")


def test_perceptual_loss_loads_local_medicalnet_weights(tmp_path):
    from common.networks.perceptual import medicalnet_resnet

    assert build_perceptual_loss("off") is None
    with pytest.raises(DataError, match="local weight file"):
        build_perceptual_loss("medicalnet", tmp_path / "missing.pth")
    torch.manual_seed(0)
    net = medicalnet_resnet(10)
    # MedicalNet's files hold {"state_dict": {"module.<name>": tensor}} (saved from DataParallel)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "resnet_10.pth")
    loss = build_perceptual_loss("medicalnet", tmp_path / "resnet_10.pth")
    x = torch.rand(1, 2, 24, 24, 24)
    y = x.clone().requires_grad_(True)
    assert float(loss(x, y).detach()) < 1e-6
    far = loss(torch.rand(1, 2, 24, 24, 24), y)
    assert float(far) > 1e-4
    far.backward()
    assert y.grad is not None and not any(p.requires_grad for p in loss.parameters())
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match="MedicalNet"):
        build_perceptual_loss("medicalnet", tmp_path / "wrong.pth")
