"""GliomaGen benchmark suites (common.gliomagen.benchmark) at a tiny size: they run and report what they claim."""

from __future__ import annotations

import numpy as np

from common.benchmarks.runner import BenchmarkContext
from common.gliomagen import benchmark as B
from common.gliomagen.masks import check_mask


def test_synthetic_mask_is_valid():
    assert check_mask(B.synthetic_mask((48, 48, 32))) == []


def test_synthesis_suite_times_one_and_two_processes(tmp_path):
    ctx = BenchmarkContext(size="demo", device="cpu", repeats=1, warmup=0, workers=2, progress=False,
                           workdir=tmp_path, overrides={"synthesis_shape": (24, 24, 16), "standin_steps": 1,
                                                        "synthesis_cases": 4})
    out = B.synthesis(ctx)
    rows = {r["variant"]: r for r in out["results"]}
    assert set(rows) == {"1 process(es)", "2 process(es)"}
    for r in rows.values():
        assert r["cases"] == 4 and r["wall_seconds"] > 0
        assert np.isclose(r["cases_per_second"], 4 / r["wall_seconds"]) and r["cpu_seconds_per_case"] > 0
    assert rows["1 process(es)"]["speedup"] == 1.0 and rows["2 process(es)"]["speedup"] > 0


def test_masks_suite_reports_draws(tmp_path):
    ctx = BenchmarkContext(size="demo", device="cpu", repeats=2, warmup=0, progress=False,
                           overrides={"mask_shape": (40, 40, 30)})
    out = B.masks(ctx)
    per_mask, per_draw = out["results"]
    assert len(per_mask["tries"]) == 2 and all(t >= 1 for t in per_mask["tries"])
    assert per_draw["seconds"]["median"] <= per_mask["seconds"]["median"] + 1e-9
