"""`rcpp-hf eval <benchmark>` and `python -m rcpp_hf.eval <benchmark>`: one sub-command per benchmark.

Each benchmark module exposes `add_eval_parser(eval_subparsers)`, which adds its sub-command and
sets `func`; BENCHMARKS below is the one list of them.
"""

from __future__ import annotations

import argparse

from rcpp_hf.eval import chair, mme, pope
from rcpp_hf.shapesworld import evaluate as shapesworld

BENCHMARKS = [pope.add_eval_parser, chair.add_eval_parser, mme.add_eval_parser, shapesworld.add_eval_parser]


def add_benchmark_parsers(parser: argparse.ArgumentParser) -> None:
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add_eval_parser in BENCHMARKS:
        add_eval_parser(benchmarks)


def add_parser(subparsers) -> None:
    """Register `rcpp-hf eval`."""
    parser = subparsers.add_parser("eval", help="run a benchmark (POPE, CHAIR, MME) into a resumable run directory")
    add_benchmark_parsers(parser)


def main(argv: list[str] | None = None) -> int:
    """`python -m rcpp_hf.eval ...`, the entry point `accelerate launch -m rcpp_hf.eval` runs in every process."""
    parser = argparse.ArgumentParser(prog="python -m rcpp_hf.eval", description=__doc__)
    add_benchmark_parsers(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
