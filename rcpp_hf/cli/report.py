"""`rcpp-hf report RUNS`: the run directories under RUNS side by side (`rcpp_hf.eval.report`)."""

from __future__ import annotations

import argparse

from rcpp_hf.eval.report import write_report


def add_parser(commands) -> None:
    parser = commands.add_parser("report", help="compare run directories: tables and plots")
    parser.add_argument("runs", help="folder holding run directories")
    parser.add_argument("--reference", default=None, help="the run every other run of its benchmark is compared to, "
                        "with paired bootstrap intervals: its folder under RUNS or a part of it, e.g. vanilla "
                        "(default: the greedy run of each benchmark that has exactly one)")  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    tables, plots = write_report(args.runs, args.reference)
    print(tables)
    print("plots: " + ", ".join(str(path) for path in plots))
