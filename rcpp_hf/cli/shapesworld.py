"""`rcpp-hf shapesworld ...`: the testbed's own commands (train, export, compare, build-smol, train-smol, export-smol).

Its single-split evaluation is `rcpp-hf eval shapesworld` (`rcpp_hf.cli.eval`). compare runs on it; so do the
studies in the repository's `experiments/` (the defaults sweep, the head ablation, the condensation experiment),
scripts that take compare's comparison arguments (`add_comparison_arguments`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rcpp_hf.cli.options import BUDGET_HELP, add_world_seed_argument, budget_argument, model_folder
from rcpp_hf.methods import METHODS
from rcpp_hf.shapesworld import compare, train
from rcpp_hf.shapesworld.caption_sets import caption_scenes, write_caption_split
from rcpp_hf.shapesworld.compare import (
    BUDGETS,
    RCPP,
    VANILLA,
    comparison_settings,
    config_setting,
)
from rcpp_hf.shapesworld.evaluate import SPLITS
from rcpp_hf.shapesworld.mme_sets import mme_scenes, write_mme_set
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS, pope_scenes, write_pope_split
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED
from rcpp_hf.smol import build as smol_build
from rcpp_hf.smol import train as smol_train


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("shapesworld", help="the ShapesWorld testbed: train its model, export its test sets")
    subcommands = parser.add_subparsers(dest="shapesworld_command", required=True)
    train.add_parser(subcommands)
    add_compare_parser(subcommands)
    smol_build.add_parser(subcommands)
    smol_train.add_parsers(subcommands)
    export = subcommands.add_parser(
        "export",
        help="write POPE question files (official JSON-lines format), an MME-style set (MME's folder layout) and caption sets",
        description="Write held-out ShapesWorld test sets to disk, e.g. for `rcpp-hf eval pope --question-file ...` or "
        "`rcpp-hf eval mme --mme-root <output-dir>/shapesworld_mme --subtasks existence count position color`.",
    )
    export.add_argument("--output-dir", required=True)
    add_world_seed_argument(export)
    export.add_argument("--num-images", type=int, default=100)
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    scenes = pope_scenes(args.seed, args.num_images)
    for split in POPE_SPLITS:
        print(write_pope_split(scenes, split, args.output_dir))
    print(write_mme_set(mme_scenes(args.seed, args.num_images), args.output_dir))
    print(write_caption_split(caption_scenes(args.seed, args.num_images), args.output_dir))
    return 0


def add_comparison_arguments(parser: argparse.ArgumentParser, seed: int = DEFAULT_WORLD_SEED) -> None:
    """What every ShapesWorld comparison takes (compare, and the studies in the repository's `experiments/`): the
    model, the world (`seed`: its default) and the run folder."""
    parser.add_argument("--model", default=None, help="checkpoint folder or shapesworld-smol (default: the embedded ShapesWorld model)")
    add_world_seed_argument(parser, seed)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", required=True)


def add_compare_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser("compare", help="compare decoding settings on ShapesWorld",
                                    description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = [name for name in METHODS if name != RCPP and compare.runs_with_defaults(name)]
    parser.add_argument("--methods", default=",".join([VANILLA, RCPP, *defaults]),
                        help=f"comma-separated rows: {VANILLA}, {RCPP} (RCPP + DRCD, library defaults) or registry "
                             f"methods ({', '.join(METHODS)}); default: all that run with their default "
                             "settings")  # fmt: skip
    parser.add_argument("--budgets", type=budget_argument, nargs="+", default=list(BUDGETS),
                        help=f"budgets of the methods with a budget setting, one row each: {BUDGET_HELP}; rows are "
                             "labelled <method>-<budget as given> (default: 0.1111 0.2222 0.3333)")
    parser.add_argument("--with-rcpp", action="store_true", help="also each registry method composed with RCPP + DRCD "
                        "('<method>+rcpp' rows)")
    parser.add_argument("--configs", nargs="+", default=[], help="extra rows: generation (RCPP) presets or method "
                        "presets, shipped names or YAML paths, e.g. a gan_pruner's with its pruner_path")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--reference", default=None, help="the row every other row's differences (with their paired "
                        f"bootstrap intervals) are taken to, e.g. {RCPP} (default: {VANILLA}, when it is a row)")
    add_comparison_arguments(parser)
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    model = model_folder(args.model)
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    settings = comparison_settings(names, tuple(args.budgets), args.with_rcpp)
    settings += [config_setting(config) for config in args.configs]
    settings = list({setting.name: setting for setting in settings}.values())  # "vanilla" named twice runs once
    if args.reference is not None and args.reference not in {setting.name for setting in settings}:
        raise ValueError(f"--reference {args.reference!r} is not a row; the rows: "
                         + ", ".join(setting.name for setting in settings))  # fmt: skip
    compare.compare(model, settings, args.splits, args.seed, args.num_images, args.output_dir, args.batch_size,
                    reference=args.reference or VANILLA)  # fmt: skip
    print((Path(args.output_dir) / "table.md").read_text())
    return 0
