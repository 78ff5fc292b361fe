"""`rcpp-hf gan-pruner ...`: the GAN layer pruner's commands (train; evaluation is `--method gan_pruner` with
`pruner_path` in any evaluation command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rcpp_hf.cli.options import model_folder
from rcpp_hf.gan_training import baselines, train


def with_model_folder(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` after `--model` is resolved as every command resolves it (`options.model_folder`: a folder, a hub id
    or shapesworld-smol, a wrong one refused in one line before anything loads)."""

    def resolved(args: argparse.Namespace) -> int:
        args.model = model_folder(args.model)
        return run(args)

    return resolved


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("gan-pruner", help="the GAN-trained layer pruner: train it on a ShapesWorld LLaVA")
    subcommands = parser.add_subparsers(dest="gan_pruner_command", required=True)
    train.add_parser(subcommands)
    baselines.add_parser(subcommands)
    for command in subcommands.choices.values():  # every one takes --model
        command.set_defaults(func=with_model_folder(command.get_default("func")))
