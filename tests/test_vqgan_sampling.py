"""Stage-2 trainer and the two decoders (MaskGIT parallel, raster) on a tiny VQGAN + transformer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Events

from common.io import DataError, load_nifti
from common.vqgan_transformer.masking import HybridMasking
from common.vqgan_transformer.networks import ImportanceVQGAN, build_transformer, build_vqgan
from common.vqgan_transformer.sampling import generate_rois, maskgit_decode, parse_classes, raster_decode, save_rois
from common.vqgan_transformer.trainer import MaskedTransformerTrainer

K = 16


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    torch.manual_seed(0)
    vqgan = ImportanceVQGAN(build_vqgan(channels=(8, 16), num_res_layers=1, num_embeddings=K, embedding_dim=8),
                            head_channels=8).eval()
    transformer = build_transformer(num_embeddings=K, grid_size=(4, 4, 4), hidden_size=32, num_layers=2,
                                    num_heads=4, dropout=0.0)
    return vqgan, transformer


def test_trainer_loss_falls_and_state(tiny):
    vqgan, _ = tiny
    torch.manual_seed(1)
    transformer = build_transformer(num_embeddings=K, grid_size=(4, 4, 4), hidden_size=32, num_layers=2,
                                    num_heads=4, dropout=0.0)
    x = torch.randn(4, 1, 16, 16, 16)
    data = [{"image": x, "class": torch.tensor([0, 1, 0, 1])}] * 15
    optimizer = torch.optim.Adam(transformer.parameters(), 3e-3)
    trainer = MaskedTransformerTrainer("cpu", 2, data, transformer, optimizer, vqgan,
                                       HybridMasking(K, topk_ratio=0.25), condition_dropout=0.2)
    codebook_before = vqgan.quantizer.embedding.weight.clone()
    losses, accuracy = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (losses.append(e.state.output["loss"]),
                                                                     accuracy.append(e.state.output["masked_accuracy"])))
    trainer.run()
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert np.mean(accuracy[-5:]) > np.mean(accuracy[:3])
    assert torch.equal(codebook_before, vqgan.quantizer.embedding.weight)  # stage 1 stays frozen
    assert {"network", "optimizer", "vqgan"} <= set(trainer.checkpoint_objects())
    assert 0 < trainer.state.output["mask_fraction"] <= 1
    with pytest.raises(ValueError, match="codebook sizes differ"):
        MaskedTransformerTrainer("cpu", 1, data, transformer, optimizer, vqgan, HybridMasking(2 * K))
    with pytest.raises(KeyError, match="'class'"):
        MaskedTransformerTrainer("cpu", 1, [{"image": x}], transformer, optimizer, vqgan,
                                 HybridMasking(K)).run()


def test_parallel_decoding_passes_and_seeds(tiny):
    _, transformer = tiny
    transformer.eval()
    codes, info = maskgit_decode(transformer, [0, 1, 1], [7, 8, 9], steps=6, guidance_scale=2.0)
    assert codes.shape == (3, 4, 4, 4) and info["network_passes"] == 6
    assert int(codes.max()) < K and int(codes.min()) >= 0  # no [MASK] left
    # per-sample seeds: the same sample whatever the batch it is drawn in
    alone, _ = maskgit_decode(transformer, [1], [8], steps=6, guidance_scale=2.0)
    assert torch.equal(alone[0], codes[1])
    again, _ = maskgit_decode(transformer, [0, 1, 1], [7, 8, 9], steps=6, guidance_scale=2.0)
    assert torch.equal(again, codes)
    other, _ = maskgit_decode(transformer, [1], [1234], steps=6, guidance_scale=2.0)
    assert not torch.equal(other[0], codes[1])
    # raster: one pass per token, same seeding rule
    rc, rinfo = raster_decode(transformer, [0, 1], [3, 4])
    assert rinfo["network_passes"] == 64 and rc.shape == (2, 4, 4, 4)
    r_alone, _ = raster_decode(transformer, [1], [4])
    assert torch.equal(r_alone[0], rc[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        maskgit_decode(transformer, [0, 1], [1])
    with pytest.raises(DataError, match="class"):
        maskgit_decode(transformer, [2], [1])


def test_generate_rois_and_outputs(tiny, tmp_path):
    vqgan, transformer = tiny
    result = generate_rois(vqgan, transformer, "both", 2, seeds=10, steps=4, batch_size=3, progress=False)
    assert result["images"].shape == (4, 1, 16, 16, 16)
    assert result["classes"] == ["LGG", "LGG", "HGG", "HGG"] and result["seeds"] == [10, 11, 12, 13]
    assert result["network_passes"] == 2 * 4  # two batches of 4 steps
    assert float(result["images"].abs().max()) <= 1.0
    single = generate_rois(vqgan, transformer, "hgg", 1, seeds=[12], steps=4, progress=False)
    assert torch.allclose(single["images"][0], result["images"][2], atol=1e-5)
    out = save_rois(result, tmp_path / "gen", spacing=(1.5, 1.5, 1.5))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["class"] for s in manifest["samples"]] == result["classes"]
    volume, affine, _ = load_nifti(out / manifest["samples"][0]["file"])
    assert volume.shape == (16, 16, 16) and np.allclose(np.diag(affine)[:3], 1.5)
    assert (out / "montage.png").stat().st_size > 0
    from common.vqgan_transformer.sampling import save_real_vs_generated

    picture = save_real_vs_generated({"LGG": result["images"][:2], "HGG": result["images"][2:]},
                                     {"LGG": result["images"][:1], "HGG": single["images"]}, tmp_path / "cmp.png")
    import matplotlib.image as mpimg

    assert mpimg.imread(picture).shape[1] > 1000  # six panels side by side


@pytest.mark.parametrize("kwargs, match", [
    ({"class_label": "GBM"}, "unknown class"),
    ({"count": 0}, "positive integer"),
    ({"count": 2.5}, "positive integer"),
    ({"seeds": [1, 2, 3]}, "seeds"),
    ({"method": "beam"}, "unknown decoding method"),
])
def test_generate_rois_bad_input(tiny, kwargs, match):
    vqgan, transformer = tiny
    args = {"class_label": "LGG", "count": 1, **kwargs}
    with pytest.raises(DataError, match=match):
        generate_rois(vqgan, transformer, progress=False, **args)
    assert parse_classes("both", 1) == [0, 1]


def test_precomputed_tokens_give_the_same_step(tiny):
    from common.vqgan_transformer.trainer import precompute_tokens

    vqgan, _ = tiny
    x = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    items = [{"image": x[i], "class": torch.tensor(i % 2)} for i in range(4)]
    pre = precompute_tokens(vqgan, items, batch_size=3)
    assert pre[0]["tokens"].shape == (4, 4, 4) and pre[0]["importance"].shape == (4, 4, 4)
    on_the_fly = {"image": x, "class": torch.tensor([0, 1, 0, 1])}
    cached = {"tokens": torch.stack([p["tokens"] for p in pre]), "importance": torch.stack([p["importance"] for p in pre]),
              "class": torch.tensor([0, 1, 0, 1])}
    losses = []
    for batch in (on_the_fly, cached):
        torch.manual_seed(3)
        transformer = build_transformer(num_embeddings=K, grid_size=(4, 4, 4), hidden_size=32, num_layers=1,
                                        num_heads=4, dropout=0.0)
        trainer = MaskedTransformerTrainer("cpu", 1, [batch], transformer,
                                           torch.optim.SGD(transformer.parameters(), 0.1), vqgan, HybridMasking(K))
        trainer.run()
        losses.append(trainer.state.output["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
