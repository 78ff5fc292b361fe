"""`rcpp-hf` command line: one sub-command per job, each registered by the module that owns it."""

from __future__ import annotations

import argparse
import sys

from rcpp_hf import generate_cli
from rcpp_hf.benchmark import cli as bench_cli
from rcpp_hf.eval import cli as eval_cli
from rcpp_hf.eval import report
from rcpp_hf.gan_training import cli as gan_pruner_cli
from rcpp_hf.shapesworld import cli as shapesworld_cli
from rcpp_hf.shapesworld import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcpp-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate_cli.add_parser(commands)
    bench_cli.add_parser(commands)
    eval_cli.add_parser(commands)
    report.add_parser(commands)
    shapesworld_cli.add_parser(commands)
    gan_pruner_cli.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
