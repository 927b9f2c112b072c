"""pix2pix networks of the cGAN imputation bundle: paper sizes, shapes, receptive field, weights round trip."""

from __future__ import annotations

import pytest
import torch

from common.cgan_imputation.networks import (
    ResnetGenerator,
    build_discriminator,
    build_generator,
    generator_config_from_state,
)


def test_paper_size_generator_and_patchgan(one_torch_thread):
    g, d = build_generator(1, "paper"), build_discriminator(1, "paper")
    # pix2pix resnet_9blocks with 1 input and 1 output channel (the 3->3 original has 11,378,179)
    assert sum(p.numel() for p in g.parameters()) == 11_378_179 - 2 * 7 * 7 * 2 * 64 - 2
    assert g.config["n_blocks"] == 9 and g.config["base_channels"] == 64
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        y = g(x)
        logits = d(torch.cat([x, y], 1))[-1]
    assert y.shape == (1, 1, 256, 256)
    assert logits.shape == (1, 1, 30, 30)  # the 70x70 PatchGAN's logit map at 256x256


def test_patchgan_receptive_field_is_70():
    d = build_discriminator(1, "paper", norm=None).eval()  # instance norm would spread gradients everywhere
    x = torch.zeros(1, 2, 256, 256, requires_grad=True)
    d(x)[-1][0, 0, 15, 15].backward()
    rows = (x.grad.abs().sum((0, 1, 3)) > 0).nonzero()
    cols = (x.grad.abs().sum((0, 1, 2)) > 0).nonzero()
    assert int(rows.max() - rows.min() + 1) == 70 and int(cols.max() - cols.min() + 1) == 70


def test_several_sources_and_outputs(one_torch_thread):
    g = build_generator(3, "demo", output="tanh")
    d = build_discriminator(3, "demo")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        y = g(x)
    assert y.shape == (2, 1, 64, 48) and y.abs().max() <= 1
    assert d(torch.cat([x, y], 1))[-1].shape[:2] == (2, 1)
    assert build_generator(1, "demo")(torch.full((1, 1, 32, 32), 5.0)).abs().max() > 0  # linear head
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="output"):
        ResnetGenerator(output="sigmoid")


def test_config_read_off_state_dict():
    g = ResnetGenerator(in_channels=2, base_channels=8, n_blocks=4, n_downsampling=3)
    config = generator_config_from_state(g.state_dict())
    assert config == {k: v for k, v in g.config.items() if k != "dropout"}
    rebuilt = ResnetGenerator(**config)
    rebuilt.load_state_dict(g.state_dict())  # strict: every tensor fits
