"""`rcpp-hf gan-pruner ...`: the GAN layer pruner's commands (train; evaluation is `--method gan_pruner` with
`pruner_path` in any evaluation command)."""

from __future__ import annotations

import argparse

from rcpp_hf.gan_training import baselines, train


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("gan-pruner", help="the GAN-trained layer pruner: train it on a ShapesWorld LLaVA")
    subcommands = parser.add_subparsers(dest="gan_pruner_command", required=True)
    train.add_parser(subcommands)
    baselines.add_parser(subcommands)
