"""VQGAN + masked transformer networks: paper sizes on the meta device, the importance wrapper, codebook health."""

from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from ignite.engine import Engine, Events

from common.vqgan_transformer.codebook import CodebookHealth, codebook_stats, farthest_first, restart_codes
from common.vqgan_transformer.networks import (
    ImportanceVQGAN,
    build_discriminator,
    build_transformer,
    build_vqgan,
)


def tiny_vqgan(num_embeddings: int = 16) -> ImportanceVQGAN:
    torch.manual_seed(0)
    return ImportanceVQGAN(build_vqgan(channels=(8, 16), num_res_layers=1, num_embeddings=num_embeddings,
                                       embedding_dim=8), head_channels=8)


def test_paper_size_networks_build_on_meta_device():
    with torch.device("meta"):
        vqgan = ImportanceVQGAN(build_vqgan())  # 4 stride-2 levels, 1024 x 128 EMA codebook
        out = vqgan(torch.zeros(1, 1, 128, 128, 128))
        transformer = build_transformer(num_embeddings=1024, grid_size=(8, 8, 8))  # 24 layers, 16 heads, 1024-d
        logits = transformer(torch.zeros(1, 512, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        disc = build_discriminator()
        d_out = disc(torch.zeros(1, 1, 128, 128, 128))
    assert out["pred"].shape == (1, 1, 128, 128, 128)
    assert out["indices"].shape == (1, 8, 8, 8) and out["importance"].shape == (1, 1, 8, 8, 8)
    assert out["class_logits"].shape == (1, 2)
    assert vqgan.quantizer.embedding.weight.shape == (1024, 128)
    assert logits.shape == (1, 512, 1024)  # logits over the codebook for every token
    assert len(transformer.blocks) == 24 and transformer.blocks[0].attn.num_heads == 16
    assert transformer.blocks[0].attn.use_flash_attention  # F.scaled_dot_product_attention
    assert transformer.token_embedding.weight.shape == (1025, 1024)  # codebook + [MASK]
    assert d_out[-1].shape[1] == 1
    assert 250e6 < sum(p.numel() for p in transformer.parameters()) < 350e6


def test_importance_wrapper_outputs_and_token_roundtrip(one_torch_thread):
    vqgan = tiny_vqgan()
    x = torch.randn(2, 1, 16, 16, 16)
    out = vqgan(x)
    assert out["pred"].shape == x.shape and out["indices"].shape == (2, 4, 4, 4)
    assert torch.allclose(out["importance"].flatten(1).sum(1), torch.ones(2), atol=1e-5)
    assert out["quantization_loss"].ndim == 0 and out["class_logits"].shape == (2, 2)
    # the classification loss reaches the encoder (joint training) and the importance head
    torch.nn.functional.cross_entropy(out["class_logits"], torch.tensor([0, 1])).backward()
    assert vqgan.importance_head[0].weight.grad.abs().sum() > 0
    assert vqgan.vqvae.encoder.blocks[0].conv.weight.grad.abs().sum() > 0
    # tokens() does not move the EMA codebook, even in training mode
    before = vqgan.quantizer.embedding.weight.clone()
    vqgan.train()
    indices, importance = vqgan.tokens(x)
    assert torch.equal(before, vqgan.quantizer.embedding.weight)
    assert importance.shape == (2, 4, 4, 4)
    vqgan.eval()
    assert torch.equal(indices, vqgan(x)["indices"])
    decoded = vqgan.decode_tokens(indices)
    assert decoded.shape == x.shape
    assert torch.allclose(decoded, vqgan(x)["pred"], atol=1e-5)
    assert vqgan.last_layer is vqgan.vqvae.decoder.blocks[-1].conv.weight
    with pytest.raises(ValueError, match="divisible"):
        vqgan.token_grid((18, 16, 16))
    assert vqgan.token_grid((32, 16, 8)) == (8, 4, 2)


def test_codebook_stats_known_answers():
    s = codebook_stats(torch.tensor([2, 2, 0, 0]))
    assert s["usage"] == 0.5 and s["used"] == 2 and s["perplexity"] == pytest.approx(2.0)
    s = codebook_stats(torch.tensor([5, 5, 5, 5]))
    assert s["usage"] == 1.0 and s["perplexity"] == pytest.approx(4.0)
    assert codebook_stats(torch.tensor([9, 1]))["perplexity"] == pytest.approx(
        math.exp(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))))


def test_dead_codes_are_restarted_from_encoder_outputs(one_torch_thread):
    """Constructed case: half the codebook is pushed far away, so the encoder never picks it; after
    ``dead_after`` iterations those codes are re-initialised from encoder outputs and start being used."""
    vqgan = tiny_vqgan(num_embeddings=16)
    vqgan.train()
    x = torch.randn(4, 1, 16, 16, 16)
    with torch.no_grad():
        z = vqgan.vqvae.encode(x).movedim(1, -1).reshape(-1, 8)
        far = torch.full((8, 8), 1e3)
        restart_codes(vqgan.quantizer, torch.arange(8), z[:8], noise=0.0)
        restart_codes(vqgan.quantizer, torch.arange(8, 16), far, noise=0.0)

    def step(engine, batch):
        with torch.no_grad():
            vqgan(batch)

    engine = Engine(step)
    health = CodebookHealth(vqgan, interval=1, dead_after=2, seed=0)
    health.attach(engine)
    usage = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: usage.append(e.state.metrics["codebook_usage"]))
    engine.run([x] * 6, max_epochs=1)
    assert usage[0] <= 0.5  # only the first half of the codebook is reachable at first
    assert health.restarts >= 8
    dead_codes = vqgan.quantizer.embedding.weight[8:]
    assert float(dead_codes.abs().max()) < 100  # moved next to the encoder outputs
    assert max(usage[3:]) > usage[0]  # restarted codes get used
    assert "codebook_perplexity" in engine.state.metrics and engine.state.metrics["codebook_restarts"] >= 8
    assert int(vqgan.code_age.max()) < 2
    with pytest.raises(ValueError):
        CodebookHealth(vqgan, interval=0)


def test_restarts_go_to_what_the_codebook_misses():
    """Constructed case: 90 encoder outputs sit on the one live code (an ROI's constant background), 10 are
    distinct tumour vectors. Restarting 10 codes takes the 10 tumour vectors; drawn uniformly, about 9 of
    them would duplicate the background code."""
    g = torch.Generator().manual_seed(0)
    background = torch.zeros(1, 8)
    tumour = torch.randn(10, 8, generator=g) + 3.0
    encodings = torch.cat([background + 1e-4 * torch.randn(90, 8, generator=g), tumour])
    encodings = encodings[torch.randperm(100, generator=g)]
    picked = farthest_first(encodings, background, 10, generator=g)
    assert sorted(map(tuple, picked.tolist())) == sorted(map(tuple, tumour.tolist()))
    # no live code at all: the first pick is uniform, the rest still spread out
    picked = farthest_first(encodings, torch.zeros(0, 8), 11, generator=g)
    assert torch.cdist(picked, picked).add(torch.eye(11) * 1e9).min() > 1e-2


def test_stage1_trains_with_the_shared_adversarial_trainer(one_torch_thread):
    """0.8 L1 + commitment + 0.2 LGG/HGG cross-entropy, hinge adversarial with the adaptive weight and feature
    matching, codebook health attached: the losses fall and the usage metrics are logged."""
    from common.engines import AdversarialTrainer
    from common.engines.losses import L1, CrossEntropy, Quantization

    vqgan = tiny_vqgan(num_embeddings=16)
    torch.manual_seed(0)
    disc = build_discriminator(channels=4, num_layers_d=1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 1, 16, 16, 16, generator=g) * 2 - 1, "class": torch.tensor([0, 1, 0, 1])}
    batch["image"][1::2] *= 0.2  # the two classes differ
    health = CodebookHealth(vqgan, interval=5, dead_after=5)
    trainer = AdversarialTrainer(
        "cpu", 1, [batch] * 30, vqgan, torch.optim.Adam(vqgan.parameters(), 2e-3),
        losses={"l1": L1(0.8), "quantization": Quantization(1.0), "classification": CrossEntropy(0.2)},
        discriminator=disc, d_optimizer=torch.optim.Adam(disc.parameters(), 2e-4), adversarial_weight=0.1,
        adversarial_warmup_iterations=10, adversarial_criterion="hinge", adaptive_weight=True,
        last_layer=vqgan.last_layer, feature_matching_weight=1.0, train_handlers=[health])
    logged = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: logged.append(dict(e.state.output.items())))
    trainer.run()
    first, last = logged[:3], logged[-3:]
    for key in ("l1", "classification"):
        assert np.mean([o[key] for o in last]) < np.mean([o[key] for o in first]), key
    assert logged[-1]["g_adv"] != 0 and logged[-1]["d_loss"] > 0  # the adversarial term is on after warm-up
    assert 0 < trainer.state.metrics["codebook_usage"] <= 1 and trainer.state.metrics["codebook_perplexity"] >= 1
    assert len(health.history) == 6


def test_eval_mode_transformer_with_dropout_is_deterministic_and_batch_independent(one_torch_thread):
    """With dropout (the paper's 0.1) the attention of MONAI's fused SABlock dropped out even in eval mode: the same
    grid gave other logits on each call and beside other samples. Eval is deterministic; training still drops."""
    torch.manual_seed(0)
    net = build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=2, num_heads=2, dropout=0.5)
    tokens, labels = torch.randint(0, 17, (4, 8)), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        net.eval()
        batch, again, alone = net(tokens, labels), net(tokens, labels), net(tokens[2:3], labels[2:3])
        assert torch.equal(batch, again)
        assert torch.allclose(batch[2], alone[0], atol=1e-5)
        assert all(block.attn.dropout_rate == 0.0 for block in net.blocks)
        net.train()
        assert all(block.attn.dropout_rate == 0.5 for block in net.blocks)
        assert not torch.allclose(net(tokens, labels), net(tokens, labels))


def test_class_on_every_token_adds_the_condition_to_each_input_without_new_weights(one_torch_thread):
    """The option changes what the network computes, not its weights: the same state dict loads into both, and
    with the option the first block's input at every token position carries the class embedding."""
    torch.manual_seed(0)
    plain = build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    every = build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=1, num_heads=2, dropout=0.0,
                              class_on_every_token=True).eval()
    every.load_state_dict(plain.state_dict())  # strict: no new parameters
    tokens, labels = torch.randint(0, 16, (2, 8)), torch.tensor([0, 1])
    seen = {}
    for name, net in (("plain", plain), ("every", every)):
        net.blocks[0].register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].detach()))
        net(tokens, labels)
    added = seen["every"][:, 1:] - seen["plain"][:, 1:]
    expected = plain.class_embedding(labels)[:, None].expand_as(added).detach()
    assert torch.allclose(added, expected, atol=1e-6)
    assert torch.equal(seen["every"][:, 0], seen["plain"][:, 0])  # the prepended class token itself is unchanged
    assert not torch.allclose(plain(tokens, labels), every(tokens, labels))
    # the value as the bundle CLI passes it (text): "false" must not switch it on
    assert build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=1, num_heads=2,
                             class_on_every_token="false").class_on_every_token is False
    assert build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=1, num_heads=2,
                             class_on_every_token="true").class_on_every_token is True
    with pytest.raises(ValueError, match="class_on_every_token"):
        build_transformer(16, (2, 2, 2), hidden_size=16, num_layers=1, num_heads=2, class_on_every_token="yes please")
