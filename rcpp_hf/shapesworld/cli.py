"""`rcpp-hf shapesworld ...`: the testbed's own commands (train, export, compare, sweep, head-ablation, condensation,
build-smol, train-smol, export-smol).

Its single-split evaluation is `rcpp-hf eval shapesworld` (`evaluate.add_eval_parser`).
"""

from __future__ import annotations

import argparse

from rcpp_hf.shapesworld import compare, condensation, head_ablation, sweep, train
from rcpp_hf.smol import build as smol_build
from rcpp_hf.smol import train as smol_train
from rcpp_hf.shapesworld.caption_sets import caption_scenes, write_caption_split
from rcpp_hf.shapesworld.mme_sets import mme_scenes, write_mme_set
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS, pope_scenes, write_pope_split
from rcpp_hf.shapesworld.world import TEST_SEED


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("shapesworld", help="the ShapesWorld testbed: train its model, export its test sets")
    subcommands = parser.add_subparsers(dest="shapesworld_command", required=True)
    train.add_parser(subcommands)
    compare.add_parser(subcommands)
    sweep.add_parser(subcommands)
    head_ablation.add_parser(subcommands)
    condensation.add_parser(subcommands)
    smol_build.add_parser(subcommands)
    smol_train.add_parsers(subcommands)
    export = subcommands.add_parser(
        "export",
        help="write POPE question files (official JSON-lines format), an MME-style set (MME's folder layout) and caption sets",
        description="Write held-out ShapesWorld test sets to disk, e.g. for `rcpp-hf eval pope --question-file ...` or "
        "`rcpp-hf eval mme --mme-root <output-dir>/shapesworld_mme --subtasks existence count position color`.",
    )
    export.add_argument("--output-dir", required=True)
    export.add_argument("--seed", type=int, default=TEST_SEED, help=f"world seed (test: {TEST_SEED})")
    export.add_argument("--num-images", type=int, default=100)
    export.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    scenes = pope_scenes(args.seed, args.num_images)
    for split in POPE_SPLITS:
        print(write_pope_split(scenes, split, args.output_dir))
    print(write_mme_set(mme_scenes(args.seed, args.num_images), args.output_dir))
    print(write_caption_split(caption_scenes(args.seed, args.num_images), args.output_dir))
    return 0
