"""`rcpp-hf` command line: one module per sub-command (generate, bench, eval, report, shapesworld, gan-pruner, demo).

The command line sits on top of the library: it may import every part of it, and no part imports it. A user's
mistake ends the command with one line on stderr and exit status 2 (`rcpp_hf.cli.errors`); `--debug` or
RCPP_HF_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse

from rcpp_hf.cli import bench, demo, eval, gan_pruner, generate, report, shapesworld
from rcpp_hf.cli.errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcpp-hf", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its one-line "
                        "message (also: RCPP_HF_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(commands)
    bench.add_parser(commands)
    eval.add_parser(commands)
    report.add_parser(commands)
    shapesworld.add_parser(commands)
    gan_pruner.add_parser(commands)
    demo.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
