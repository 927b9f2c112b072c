"""Networks, conditions and the sampler: paper-size LDM-3D shapes (meta device: no compute), mask / class / image
conditions with their null conditions, the one sampling loop in latent and pixel space, the perceptual loss."""

from __future__ import annotations

import pytest
import torch

from common.io import DataError
from common.conditions import ClassCondition, ConditionedDenoiser, ImageCondition, MaskCondition
from common.ldm3d import build_ldm
from common.networks import build_autoencoder, build_perceptual_loss, build_unet
from common.samplers import DiffusionSampler, make_scheduler


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
    cond = MaskCondition(labels=(1, 2, 3), channels=(8, 8), out_channels=4, tokens=True, cross_attention_dim=16,
                         token_grid=(2, 2, 2), norm_num_groups=4)
    with torch.no_grad():
        cond.null_features.copy_(torch.arange(4.0))
    mask = torch.randint(0, 4, (2, 1, 16, 16, 8)).float()
    one_hot = torch.cat([(mask == v) for v in (1, 2, 3)], 1).float()
    f1, t1 = cond(mask)
    f2, t2 = cond(one_hot)
    assert torch.allclose(f1, f2) and torch.allclose(t1, t2)
    assert f1.shape == (2, 4, 4, 4, 2) and t1.shape == (2, 8, 16)  # 4x down; token count = prod(token_grid)
    fd, td = cond(mask, drop=torch.tensor([True, False]))
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


def _tiny_pixel_denoiser():
    """Med-DDPM-like: 2 noisy contrasts + the one-hot 3-label mask (background included) concatenated."""
    torch.manual_seed(0)
    unet = build_unet(2, 3, None, base_channels=8, channel_mult=(1, 1), attention_levels=(False, False),
                      num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
    with torch.no_grad():
        for p in unet.out.parameters():
            p.normal_(0.0, 0.2)
    return ConditionedDenoiser(unet, MaskCondition(labels=(0, 2, 3))).eval()


@pytest.mark.parametrize("space", ["latent", "pixel"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 3), ("rflow", 3), ("ddpm", 8)])
def test_sampler_seeds_are_per_sample_and_batch_independent(space, sampler, steps):
    if space == "latent":
        ldm = _tiny_ldm()
        ldm.scale_factor.fill_(1.0)
        channels = 4
    else:
        ldm = _tiny_pixel_denoiser()
        channels = 2
    sched = make_scheduler(sampler, num_train_timesteps=8)
    kw = dict(num_inference_steps=steps, num_samples=2, seed=5, progress=False)
    together = DiffusionSampler(sched, batch_size=2, **kw)(_mask(), ldm)
    alone = DiffusionSampler(sched, batch_size=1, **kw)(_mask(), ldm)
    assert together.shape == (2, channels, 16, 16, 8)
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1])  # different seeds, different samples
    again = DiffusionSampler(sched, seeds=[6], num_inference_steps=steps, progress=False)(_mask(), ldm)
    assert torch.allclose(again[0], together[1], atol=1e-5)  # seed 6 was sample 1


def test_guidance_changes_samples_and_ddpm_needs_all_steps():
    ldm = _tiny_ldm()
    ldm.scale_factor.fill_(1.0)
    with torch.no_grad():  # make the null condition differ from the mask's
        ldm.conditioner.null_features.fill_(3.0)
    sched = make_scheduler("ddim", num_train_timesteps=8)
    plain = DiffusionSampler(sched, num_inference_steps=2, progress=False)(_mask(), ldm)
    guided = DiffusionSampler(sched, num_inference_steps=2, guidance_scale=3.0, progress=False)(_mask(), ldm)
    assert torch.isfinite(guided).all() and not torch.allclose(plain, guided)
    with pytest.raises(ValueError, match="ddim"):
        DiffusionSampler(make_scheduler("ddpm", num_train_timesteps=20), num_inference_steps=5)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler")


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


def test_pixel_denoiser_concatenates_one_hot_mask_and_null_replaces_it():
    net = _tiny_pixel_denoiser()
    assert net.unet.conv_in.conv.in_channels == 2 + 3
    channels, tokens = net.conditioner(_mask())
    assert tokens is None and channels.shape == (1, 3, 16, 16, 8)
    assert torch.equal(channels.sum(1), torch.ones(1, 16, 16, 8))  # one-hot with background
    with torch.no_grad():
        net.conditioner.null_features.copy_(torch.tensor([7.0, 8.0, 9.0]))
    dropped, _ = net.conditioner(_mask(), drop=torch.tensor([True]))
    assert torch.equal(dropped[0, :, 0, 0, 0], torch.tensor([7.0, 8.0, 9.0]))
    null, _ = net.encode_condition(None, 2, (16, 16, 8))
    assert null.shape == (2, 3, 16, 16, 8) and torch.equal(null[1, 2], torch.full((16, 16, 8), 9.0))
    assert net.sample_shape((16, 16, 8)) == (2, 16, 16, 8)
    x, t = torch.randn(1, 2, 16, 16, 8), torch.zeros(1, dtype=torch.long)
    assert not torch.allclose(net(x, t, condition=_mask()), net(x, t))  # the mask changes the prediction


def test_class_and_image_conditions_with_null():
    cls = ClassCondition(num_classes=2, embed_dim=6)
    _, tokens = cls(torch.tensor([0, 1, 1]))
    assert tokens.shape == (3, 1, 6) and not torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[1], tokens[2])
    _, dropped = cls(torch.tensor([0, 1]), drop=torch.tensor([True, False]))
    _, null = cls.null(1)
    assert torch.equal(dropped[0], null[0]) and torch.equal(dropped[1], tokens[1])
    with pytest.raises(ValueError, match="class labels"):
        cls(torch.tensor([2]))
    img = ImageCondition(in_channels=2)
    source = torch.rand(2, 2, 8, 8)
    channels, none = img(source, drop=torch.tensor([False, True]))
    assert none is None and torch.equal(channels[0], source[0]) and torch.equal(channels[1], torch.zeros(2, 8, 8))


def test_class_conditioned_denoiser_samples_need_a_shape_and_follow_the_class():
    torch.manual_seed(0)
    unet = build_unet(1, 0, None, base_channels=8, channel_mult=(1, 1), attention_levels=(False, True),
                      num_res_blocks=1, num_head_channels=8, cross_attention_dim=8, norm_num_groups=4, spatial_dims=2)
    with torch.no_grad():  # MONAI zero-initialises output and attention-output layers: wake them up
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    net = ConditionedDenoiser(unet, ClassCondition(2, 8)).eval()
    sched = make_scheduler("ddim", num_train_timesteps=8)
    with pytest.raises(ValueError, match="explicit sample shape"):
        DiffusionSampler(sched, num_inference_steps=2, progress=False)(torch.tensor([0]), net)
    sampler = DiffusionSampler(sched, num_inference_steps=2, shape=(1, 8, 8), num_samples=2, progress=False)
    out = sampler(torch.tensor([0, 1]), net)
    assert out.shape == (4, 1, 8, 8)
    assert not torch.allclose(out[0], out[2])  # same seed, other class
    assert torch.allclose(out[:2], sampler(torch.tensor([0]), net))  # class 0 alone, same seeds
    with pytest.raises(ValueError, match="num_samples"):
        DiffusionSampler(sched, num_samples=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiffusionSampler(sched, num_inference_steps=0)


def test_unet_gradient_checkpointing_gives_the_same_gradients_and_keys():
    grads, keys = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = build_unet(2, 3, None, base_channels=8, channel_mult=(1, 2), attention_levels=(False, True),
                          num_res_blocks=1, num_head_channels=8, norm_num_groups=4, gradient_checkpointing=checkpointing)
        unet.train()
        x = torch.randn(2, 5, 8, 8, 8, generator=torch.Generator().manual_seed(1))
        unet(x, torch.tensor([3, 7])).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
        keys.append(list(unet.state_dict()))
    assert keys[0] == keys[1]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
