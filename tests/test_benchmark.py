"""`python -m tools benchmark`: real code paths at tiny sizes; machine info, side-by-side variants, ordering."""

from __future__ import annotations

import json

import pytest
import torch

from common.benchmarks import BenchmarkContext, parse_samplers, run_benchmark, save_report, to_markdown
from common.ldm3d.benchmark import bundle_parser

# a few-kilobyte LDM: 16x16x8 images, 4x4x2 latents, two-level UNet
TINY = {
    "spatial_size": [16, 16, 8], "ae_channels": [4, 8, 8], "ae_norm_groups": 4, "ae_num_res_blocks": 1,
    "latent_channels": 2, "discriminator_channels": 4, "discriminator_def#num_layers_d": 1, "batch_size": 1,
    "diffusion_batch_size": 1, "unet_base_channels": 8, "unet_channel_mult": [1, 2], "unet_num_res_blocks": 1,
    "unet_num_head_channels": 4, "unet_norm_groups": 4, "cross_attention_dim": 8, "conditioner_channels": [4, 8],
    "condition_channels": 2, "token_grid": [2, 2, 1], "unet_attention_levels": [False, True],
}
MACHINE_KEYS = {"cpu", "cpu_cores", "ram_gib", "gpu", "versions", "date_utc", "command"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks on shared cores: one thread keeps timings steady (and the tests fast)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_variant(suite: dict) -> dict:
    return {r["variant"]: r for r in suite["results"]}


def _check_measured(r: dict) -> None:
    sec = r["seconds"]
    assert sec["n"] >= 1 and all(v > 0 for v in sec["values"])
    assert sec["min"] <= sec["median"] <= sec["max"]


def test_sampling_fewer_steps_measure_faster_and_extrapolation_is_close():
    report = run_benchmark("ldm3d_sample", size="demo", device="cpu", repeats=3, warmup=1,
                           samplers="ddim:5,ddim:50,rflow:10", max_steps=0, overrides=TINY, progress=False)
    assert MACHINE_KEYS <= set(report["machine"]) and report["machine"]["versions"]["torch"] == torch.__version__
    suite = report["suites"]["ldm3d_sample"]
    res = _by_variant(suite)
    assert list(res) == ["DDIM-5", "DDIM-50", "RFlow-10"]
    for r in res.values():
        _check_measured(r)
        assert r["extrapolated"] is False and r["per_step_s"] > 0
    # 10x the denoising steps must cost clearly more (decoder and conditioner are shared fixed costs)
    assert res["DDIM-50"]["seconds"]["median"] > 3 * res["DDIM-5"]["seconds"]["median"]
    assert res["DDIM-5"]["speedup"] == 1.0 and res["DDIM-50"]["speedup"] < 0.35

    # the same 50-step sampler timed over 10 steps and extrapolated lands near the full measurement
    short = run_benchmark("ldm3d_sample", size="demo", device="cpu", repeats=3, warmup=1, samplers="ddim:50",
                          max_steps=10, overrides=TINY, progress=False)
    est = short["suites"]["ldm3d_sample"]["results"][0]
    assert est["extrapolated"] is True and est["measured_steps"] == 10 and est["steps"] == 50
    full = res["DDIM-50"]["seconds"]["median"]
    assert 0.5 * full < est["seconds"]["median"] < 2.0 * full
    assert any("EXTRAPOLATED" in n for n in short["suites"]["ldm3d_sample"]["notes"])


def test_training_suite_runs_variants_side_by_side():
    report = run_benchmark("ldm3d_train", size="demo", device="cpu", repeats=2, warmup=1, overrides=TINY,
                           progress=False)
    suite = report["suites"]["ldm3d_train"]
    groups = {(r["group"], r["variant"]): r for r in suite["results"]}
    for variant in ("fp32", "bf16 autocast", "fp32 + checkpointing", "bf16 autocast + checkpointing"):
        r = groups[("autoencoder", variant)]
        _check_measured(r)
        assert r["seconds"]["n"] == 2 and r["reference"] == "fp32" and r["unit"] == "s/iteration"
        assert r["memory_measure"] == "cpu_peak_rss_delta" and r["peak_memory_mib"] is not None
    _check_measured(groups[("diffusion", "fp32")])
    bf16 = groups[("diffusion", "bf16 autocast")]
    # a variant that breaks is recorded, not fatal (bf16 on CPU has given a sporadic NaN loss on this tiny net)
    if "failed" in bf16:
        assert bf16["failed"].startswith("non-finite loss")
    else:
        _check_measured(bf16)
    assert groups[("autoencoder", "fp32")]["speedup"] == 1.0
    # fp16 + GradScaler is a CUDA-only mode: recorded as skipped, not silently dropped
    assert groups[("autoencoder", "fp16 autocast + GradScaler")]["skipped"] == "needs CUDA"
    assert "16x16x8" in suite["notes"][0]  # the overridden bundle config was built
    md = to_markdown(report)
    assert "| autoencoder | fp32 + checkpointing |" in md and "skipped: needs CUDA" in md
    assert report["machine"]["cpu"] in md


def test_out_of_memory_is_recorded_and_the_run_goes_on(monkeypatch):
    import common.ldm3d.benchmark as bench

    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "stage2_trainer", no_memory)
    report = run_benchmark("ldm3d_train", size="demo", device="cpu", repeats=1, warmup=0, overrides=TINY,
                           progress=False)
    groups = {(r["group"], r["variant"]): r for r in report["suites"]["ldm3d_train"]["results"]}
    assert groups[("diffusion", "fp32")]["failed"].startswith("out of memory")
    _check_measured(groups[("autoencoder", "fp32")])
    assert "FAILED: out of memory" in to_markdown(report)


def test_phantoms_and_preprocess_suites(tmp_path):
    overrides = {"phantom_shape": [40, 40, 28], "phantom_cases": 2, "phantom_serial_cases": 1,
                 "preprocess_variants": [("3 mm, no N4", {"spacing": 3.0, "registration_finest_mm": 3.0, "n4": False})]}
    report = run_benchmark("phantoms,preprocess", size="demo", repeats=1, warmup=0, workers=2, overrides=overrides,
                           progress=False, workdir=tmp_path)
    phantoms = _by_variant(report["suites"]["phantoms"])
    assert set(phantoms) == {"generate_case", "make_phantoms workers=1 (1 cases)", "make_phantoms workers=2 (2 cases)"}
    for r in phantoms.values():
        _check_measured(r)
    parallel = phantoms["make_phantoms workers=2 (2 cases)"]
    assert parallel["reference"] == "make_phantoms workers=1 (1 cases)"
    # the parent's RSS says nothing about work done in worker processes: their own peak is reported instead
    assert parallel["peak_memory_mib"] is None and parallel["worker_peak_rss_mib"] > 0
    pre = report["suites"]["preprocess"]["results"][0]
    _check_measured(pre)
    steps = pre["per_step_median_s"]
    assert {"n4", "coregistration", "atlas_registration", "resampling", "skull_strip"} <= set(steps)
    assert pre["config"]["spacing"] == 3.0 and pre["config"]["n4"] is False
    assert sum(steps.values()) <= pre["seconds"]["median"] + 0.1  # steps are parts of the whole case
    assert not list(tmp_path.iterdir())  # phantom cases written for timing are cleaned up


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    from tools.benchmark import benchmark

    out = tmp_path / "bench" / "bench.json"
    benchmark(suite="ldm3d_sample", size="demo", device="cpu", repeats=1, warmup=0, out=str(out),
              samplers="ddpm:1000,ddim:3", max_steps=3, progress=False)
    report = json.loads(out.read_text())
    assert MACHINE_KEYS <= set(report["machine"]) and report["settings"]["max_steps"] == 3
    res = _by_variant(report["suites"]["ldm3d_sample"])
    assert res["DDPM-1000"]["extrapolated"] is True and res["DDIM-3"]["extrapolated"] is False
    # demo sizes come from the bundle's demo.json
    assert "4x64x64x32" in report["suites"]["ldm3d_sample"]["notes"][0]
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "DDPM-1000 (extrapolated)" in md and "EXTRAPOLATED" in md
    assert "DDPM-1000" in capsys.readouterr().out


def test_networks_are_built_from_the_bundle_configs():
    paper = bundle_parser(BenchmarkContext("paper", "cpu"))
    demo = bundle_parser(BenchmarkContext("demo", "cpu"))
    assert paper["spatial_size"] == [128, 128, 64] and paper["ae_channels"] == [64, 128, 256]
    assert demo["spatial_size"] != paper["spatial_size"]
    big = bundle_parser(BenchmarkContext("paper", "cpu", overrides={"unet_base_channels": 352}),
                        autoencoder="@autoencoder_def")
    with torch.device("meta"):
        assert big.get_parsed_content("network_def").unet.block_out_channels[0] == 352


def test_engine_suite_compares_our_trainers_with_a_plain_loop():
    report = run_benchmark("engine", size="demo", device="cpu", repeats=2, warmup=1, overrides=TINY, progress=False)
    results = report["suites"]["engine"]["results"]
    groups = {r["group"] for r in results}
    assert groups == {"autoencoder fp32", "autoencoder bf16 autocast", "diffusion fp32", "diffusion bf16 autocast"}
    for r in results:
        if "failed" in r:  # bf16 on CPU has given a sporadic NaN loss on this tiny net: recorded, not fatal
            assert "bf16" in r["group"] and r["failed"].startswith("non-finite loss")
            continue
        _check_measured(r)
        assert r["iterations"] == 2 * 3 and r["reference"] == "plain loop"
    assert [r["variant"] for r in results[:2]] == ["plain loop", "ours"]
    assert all("failed" not in r for r in results if "fp32" in r["group"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"suite": "nope"}, "unknown suite"),
        ({"size": "huge"}, "size must be one of"),
        ({"repeats": 0}, "repeats must be"),
        ({"samplers": "euler:10"}, "unknown sampler"),
        ({"samplers": "ddim"}, "step count"),
        ({"max_steps": 1}, "max_steps must be"),
        ({"overrides": {"unet_channels": 8}}, "unknown override"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"suite": "ldm3d_sample", "device": "cpu", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_benchmark(**args)


def test_parse_samplers():
    assert parse_samplers("ddpm:1000, ddim:50,rflow:30") == [("ddpm", 1000), ("ddim", 50), ("rflow", 30)]


def test_save_report_writes_both_files_atomically(tmp_path):
    report = {"machine": {"cpu": "x", "cpu_cores": 1, "ram_gib": 1, "gpu": None, "versions": {}, "date_utc": "d",
                          "command": "c", "python": "3", "platform": "p"},
              "settings": {"size": "demo", "device": "cpu", "repeats": 1, "warmup": 0},
              "suites": {"s": {"results": [{
                  "group": "g", "variant": "v", "unit": "s", "reference": "v", "speedup": 1.0,
                  "seconds": {"median": 1.5, "min": 1.0, "max": 2.0, "n": 3, "values": []}}]}}}
    json_path, md_path = save_report(report, tmp_path / "r.json")
    assert json.loads(json_path.read_text())["suites"]["s"]["results"][0]["seconds"]["median"] == 1.5
    assert "| g | v | 1.50 | 1.00 | 2.00 | s | reference |" in md_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


@pytest.mark.gpu
def test_training_and_sampling_on_cuda():
    report = run_benchmark("ldm3d_train,ldm3d_sample", size="demo", device="cuda", repeats=2, warmup=1,
                           samplers="ddim:5,ddim:50", max_steps=0, overrides=TINY, progress=False)
    assert report["machine"]["gpu"] and report["machine"]["gpu_memory_gib"] > 0
    train = {(r["group"], r["variant"]): r for r in report["suites"]["ldm3d_train"]["results"]}
    fp16 = train[("autoencoder", "fp16 autocast + GradScaler")]
    assert "skipped" not in fp16 and fp16["memory_measure"] == "cuda_max_memory_allocated"
    assert all(r["peak_memory_mib"] > 0 for r in train.values())
    res = _by_variant(report["suites"]["ldm3d_sample"])
    assert res["DDIM-50"]["seconds"]["median"] > 3 * res["DDIM-5"]["seconds"]["median"]
