"""The VQGAN + masked transformer benchmark suites on tiny sizes: rows, pass counts, fp32 vs bf16."""

from __future__ import annotations

import pytest

from common.benchmarks.runner import BenchmarkContext
from common.vqgan_transformer.benchmark import sample, sizes, train

TINY = {"roi_size": 16, "vqgan_channels": [8, 8], "num_res_layers": 1, "num_embeddings": 16, "embedding_dim": 8,
        "discriminator_channels": 4, "discriminator_layers": 1, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "batch_size": 2,
        "transformer_batch_size": 2, "decoding_steps": 4, "samples": 2}


def test_sampling_suite_counts_passes_and_extrapolates(one_torch_thread):
    ctx = BenchmarkContext("demo", "cpu", repeats=1, warmup=0, max_steps=8, overrides=TINY, progress=False)
    out = sample(ctx)
    rows = {r["variant"]: r for r in out["results"]}
    raster, parallel = rows["raster (1 token per pass)"], rows["MaskGIT parallel (4 steps)"]
    assert raster["network_passes"] == 64 and raster["extrapolated"] is True
    assert parallel["network_passes"] == 4 and parallel["passes_ratio"] == 16
    assert raster["seconds"]["median"] > 0 and parallel["seconds"]["median"] > 0
    assert any("extrapolated" in n for n in out["notes"])


def test_training_suite_fp32_and_bf16(one_torch_thread):
    ctx = BenchmarkContext("demo", "cpu", repeats=1, warmup=1, overrides=TINY, progress=False)
    out = train(ctx)
    rows = [(r["group"], r["variant"]) for r in out["results"] if "seconds" in r]
    assert rows == [("vqgan_iteration", "fp32"), ("vqgan_iteration", "bf16"),
                    ("transformer_iteration", "fp32"), ("transformer_iteration", "bf16"),
                    ("transformer_iteration", "fp32, codes precomputed")], out["results"]
    assert out["tokens"] == 64


def test_sizes_refuse_unknown_overrides():
    assert sizes("paper")["num_layers"] == 24 and sizes("paper")["roi_size"] == 128
    assert sizes("demo", {"num_layers": 2})["num_layers"] == 2
    with pytest.raises(ValueError, match="unknown vqgan_transformer override"):
        sizes("demo", {"unet_channels": 3})
