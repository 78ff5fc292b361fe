"""`rcpp-hf shapesworld ...`: the testbed's own commands (train, export, compare, sweep, head-ablation, condensation,
build-smol, train-smol, export-smol).

Its single-split evaluation is `rcpp-hf eval shapesworld` (`rcpp_hf.cli.eval`). compare and the studies run on it
(sweep, head-ablation, condensation) share the comparison arguments (`add_comparison_arguments`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from rcpp_hf.cli.options import add_world_seed_argument, model_folder
from rcpp_hf.methods import METHODS
from rcpp_hf.methods.fastv_finepruner import DYNAMIC
from rcpp_hf.methods.head_selection import HEAD_STRATEGIES
from rcpp_hf.shapesworld import compare, train
from rcpp_hf.shapesworld.caption_sets import caption_scenes, write_caption_split
from rcpp_hf.shapesworld.compare import BUDGETS, RCPP, VANILLA, comparison_settings, config_setting, model_shape
from rcpp_hf.shapesworld.evaluate import SPLITS
from rcpp_hf.shapesworld.mme_sets import mme_scenes, write_mme_set
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS, pope_scenes, write_pope_split
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED, VALIDATION_SEED
from rcpp_hf.smol import build as smol_build
from rcpp_hf.smol import train as smol_train
from rcpp_hf.studies import condensation_experiment, defaults_sweep, head_ablation

POPE_SPLIT_CHOICES = ["random", "popular", "adversarial"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("shapesworld", help="the ShapesWorld testbed: train its model, export its test sets")
    subcommands = parser.add_subparsers(dest="shapesworld_command", required=True)
    train.add_parser(subcommands)
    add_compare_parser(subcommands)
    add_sweep_parser(subcommands)
    add_head_ablation_parser(subcommands)
    add_condensation_parser(subcommands)
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
    """What every ShapesWorld comparison command (compare, sweep, head-ablation, condensation) takes: the model,
    the world (`seed`: its default) and the run folder."""
    parser.add_argument("--model", default=None, help="checkpoint folder or shapesworld-smol (default: the embedded ShapesWorld model)")
    add_world_seed_argument(parser, seed)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", required=True)


def _study_parser(subcommands, name: str, summary: str, module) -> argparse.ArgumentParser:
    return subcommands.add_parser(name, help=summary, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def add_compare_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = _study_parser(subcommands, "compare", "compare decoding settings on ShapesWorld", compare)
    defaults = [name for name in METHODS if name != RCPP and compare.runs_with_defaults(name)]
    parser.add_argument("--methods", default=",".join([VANILLA, RCPP, *defaults]),
                        help=f"comma-separated rows: {VANILLA}, {RCPP} (RCPP + DRCD, library defaults) or registry "
                             f"methods ({', '.join(METHODS)}); default: all that run with their default "
                             "settings")  # fmt: skip
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS),
                        help="visual-token budgets of the pruners, of 576 (scaled to the model's image)")
    parser.add_argument("--with-rcpp", action="store_true", help="also each registry method composed with RCPP + DRCD "
                        "('<method>+rcpp' rows)")
    parser.add_argument("--configs", nargs="+", default=[], help="extra rows: RCPP YAML presets, or registry method "
                        "presets (a 'method' key), e.g. a gan_pruner with its pruner_path")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    add_comparison_arguments(parser)
    parser.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    model = model_folder(args.model)
    names = [name.strip() for name in args.methods.split(",") if name.strip()]
    settings = comparison_settings(names, tuple(args.budgets), model_shape(model)[1], args.with_rcpp)
    settings += [config_setting(config) for config in args.configs]
    settings = list({setting.name: setting for setting in settings}.values())  # "vanilla" named twice runs once
    compare.compare(model, settings, args.splits, args.seed, args.num_images, args.output_dir, args.batch_size)
    print((Path(args.output_dir) / "table.md").read_text())
    return 0


def add_sweep_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = _study_parser(subcommands, "sweep", "choose RCPP + DRCD's defaults by a rule fixed before the run",
                           defaults_sweep)
    add_comparison_arguments(parser, seed=VALIDATION_SEED)  # it chooses settings: never on the test world by default
    parser.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    chosen = defaults_sweep.sweep(model_folder(args.model), args.seed, args.num_images, args.output_dir,
                                  args.batch_size, defaults_sweep.FIRST_ROUND)  # fmt: skip
    print((Path(args.output_dir) / "ranking.md").read_text())
    changes = json.loads((Path(args.output_dir) / "choice.json").read_text())["changes"]
    print(f"chosen: {chosen['setting']}" + ("" if changes is None else f" (changes to the centre: {changes})"))
    return 0


def add_head_ablation_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = _study_parser(subcommands, "head-ablation", "FastV + FinePruner head strategies x heads x budgets",
                           head_ablation)
    parser.add_argument("--strategies", nargs="+", default=[*HEAD_STRATEGIES, DYNAMIC],
                        choices=[*HEAD_STRATEGIES, DYNAMIC])  # fmt: skip
    parser.add_argument("--heads", type=int, nargs="+", default=list(head_ablation.STUDY_HEADS),
                        help="H, of 32 heads (scaled)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="of 576 visual tokens (scaled)")
    parser.add_argument("--split", default="adversarial", choices=POPE_SPLIT_CHOICES)
    add_comparison_arguments(parser)
    parser.set_defaults(func=run_head_ablation)


def run_head_ablation(args: argparse.Namespace) -> int:
    model = model_folder(args.model)
    num_heads = AutoConfig.from_pretrained(model).text_config.num_attention_heads
    settings = head_ablation.ablation_settings(args.strategies, tuple(args.heads), tuple(args.budgets),
                                               model_shape(model)[1], num_heads)  # fmt: skip
    rows = compare.compare(model, settings, [args.split], args.seed, args.num_images, args.output_dir,
                           args.batch_size)  # fmt: skip
    head_ablation.ablation_table(rows, args.split, Path(args.output_dir))
    print((Path(args.output_dir) / "ablation.md").read_text())
    return 0


def add_condensation_parser(subcommands: argparse._SubParsersAction) -> None:
    parser = _study_parser(subcommands, "condensation", "hard pruning vs FPS / connectivity condensation over target "
                           "tokens x layers (MME-style set and POPE)", condensation_experiment)
    parser.add_argument("--target-tokens", type=int, nargs="+", default=list(condensation_experiment.TARGET_TOKENS),
                        help="visual tokens kept, of 576 (scaled to the model's image)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="condensation layers of this model "
                        "(default: 5 / 10 / 15 of 32, scaled by depth)")
    parser.add_argument("--variants", nargs="+", default=list(condensation_experiment.VARIANTS),
                        choices=condensation_experiment.VARIANTS)
    parser.add_argument("--pope-split", default="adversarial", choices=POPE_SPLIT_CHOICES)
    add_comparison_arguments(parser)
    parser.set_defaults(func=run_condensation)


def run_condensation(args: argparse.Namespace) -> int:
    model = model_folder(args.model)
    num_layers, num_visual = model_shape(model)
    layers = tuple(args.layers) if args.layers else condensation_experiment.default_layers(num_layers)
    settings = condensation_experiment.experiment_settings(tuple(args.target_tokens), layers, num_visual,
                                                           tuple(args.variants))  # fmt: skip
    rows = compare.compare(model, settings, ["mme", args.pope_split], args.seed, args.num_images, args.output_dir,
                           args.batch_size)  # fmt: skip
    condensation_experiment.write_report(condensation_experiment.cell_records(rows, args.pope_split),
                                         Path(args.output_dir))  # fmt: skip
    print((Path(args.output_dir) / "condensation.md").read_text())
    return 0
