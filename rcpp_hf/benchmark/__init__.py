"""Speed and memory benchmark: RCPP + DRCD beside vanilla decoding and a two-pass contrastive reference (VCD)."""

from rcpp_hf.benchmark.suite import BenchmarkSettings, run_speed_benchmark

__all__ = ["BenchmarkSettings", "run_speed_benchmark"]
