"""The cGAN imputation benchmark suites run side by side on tiny settings and report what they timed."""

from __future__ import annotations

import pytest

from common.benchmarks.runner import BenchmarkContext
from common.cgan_imputation import benchmark

TINY = {"cgan_volume": [64, 64, 8], "cgan_slices": 4, "cgan_batches": [1, 4], "spatial_size": [64, 64],
        "batch_size": 1, "batch_samples": 2}


def test_impute_and_train_suites(one_torch_thread):
    ctx = BenchmarkContext("demo", "cpu", repeats=1, warmup=0, overrides=TINY, progress=False)
    out = benchmark.impute(ctx)
    rows = {r["variant"]: r for r in out["results"]}
    assert set(rows) == {"batch 1 fp32", "batch 4 fp32", "batch 16 bf16"}
    for r in rows.values():
        assert "failed" not in r, r
        assert r["unit"] == "s/volume" and r["seconds"]["median"] > 0 and r["extrapolated"] and r["slices_timed"] == 4
    assert "scaled x2.00" in out["notes"][0]
    train = benchmark.train(ctx)
    assert [r["variant"] for r in train["results"]] == ["fp32", "bf16 autocast"]
    assert all(r["seconds"]["median"] > 0 and r["slices"] == 2 for r in train["results"])


def test_sizes_follow_the_paper_and_refuse_unknown_overrides():
    paper = benchmark.sizes(BenchmarkContext("paper", "cpu", progress=False))
    assert (paper["n_blocks"], paper["base_channels"], paper["disc_channels"]) == (9, 64, 64)
    assert paper["cgan_volume"] == [240, 240, 155] and paper["cgan_batches"] == [1, 16, 64]
    assert benchmark.sizes(BenchmarkContext("demo", "cpu", overrides={"guidance_scale": 1.0}, progress=False))
    with pytest.raises(ValueError, match="unknown overrides"):
        benchmark.sizes(BenchmarkContext("demo", "cpu", overrides={"unet_channels": 8}, progress=False))
