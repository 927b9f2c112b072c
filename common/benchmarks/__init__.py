"""Benchmarks: the runner (:mod:`common.benchmarks.runner`) and the generic suites; method suites live beside
their method and are registered by name in :data:`common.benchmarks.runner.SUITES`."""

from common.benchmarks.runner import (SIZES, SUITES, BenchmarkContext, machine_info, parse_samplers, run_benchmark,
                                      save_report, to_markdown)

__all__ = ["SIZES", "SUITES", "BenchmarkContext", "machine_info", "parse_samplers", "run_benchmark", "save_report",
           "to_markdown"]
