"""`rcpp-hf eval <benchmark>` (also `python -m rcpp_hf.cli eval <benchmark>`): one sub-command per benchmark
(POPE, CHAIR, MME on their own data; ShapesWorld's splits), each into a resumable run directory.

BENCHMARKS below is the one list of them; the POPE, CHAIR and MME sub-commands share the run options
(`add_run_arguments`, the command-line twins of `rcpp_hf.eval.RunOptions`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcpp_hf.cli.errors import UsageError
from rcpp_hf.cli.options import (
    add_method_arguments,
    add_world_seed_argument,
    check_at_least,
    check_device,
    model_folder,
)
from rcpp_hf.eval.answerer import DTYPES, IMAGE_ASPECTS, LLAVA_SYSTEM_PROMPT
from rcpp_hf.eval.chair import DEFAULT_NUM_IMAGES, evaluate_chair, read_image_ids
from rcpp_hf.eval.chair import DEFAULT_PROMPT as CHAIR_PROMPT
from rcpp_hf.eval.harness import RunOptions
from rcpp_hf.eval.mme import DEFAULT_PROMPT as MME_PROMPT
from rcpp_hf.eval.mme import SUBTASKS, evaluate_mme
from rcpp_hf.eval.pope import DEFAULT_PROMPT as POPE_PROMPT
from rcpp_hf.eval.pope import evaluate_pope, question_format
from rcpp_hf.run_config import load_method_preset
from rcpp_hf.shapesworld import evaluate as shapesworld_evaluate
from rcpp_hf.shapesworld.evaluate import SPLITS, EvalSettings, evaluate


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line twins of `RunOptions`, for the POPE, CHAIR and MME sub-commands."""
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", required=True, help="run directory (resumed when it exists)")
    group.add_argument("--model", help="checkpoint folder or hub id or shapesworld-smol (default: the embedded default model)")
    group.add_argument("--config", help="generation (RCPP) preset: a shipped name (rcpp_default, rcpp_evict, "
                       "...) or a YAML path (default: plain greedy LLaVA decoding)")
    add_method_arguments(group)
    group.add_argument("--batch-size", type=int, default=1)
    group.add_argument("--max-new-tokens", type=int, help="default: the benchmark's")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--dtype", default="auto", choices=list(DTYPES))
    group.add_argument("--device", help="e.g. cpu, cuda:0 (default: the device accelerate assigns)")
    group.add_argument("--system-prompt", default=LLAVA_SYSTEM_PROMPT)
    group.add_argument("--image-aspect", default="pad", choices=IMAGE_ASPECTS, help="pad to square (LLaVA-1.5) or centre-crop")
    group.add_argument("--limit", type=int, help="only the first N items")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """The run options, after the checks that name the flag (RunOptions would name only its field)."""
    for flag in ("max_new_tokens", "batch_size", "limit"):
        check_at_least(getattr(args, flag), 1, "--" + flag.replace("_", "-"))
    check_device(args.device)
    return RunOptions(
        output_dir=args.output_dir,
        model=model_folder(args.model),
        config=args.config,
        method=args.method,
        method_config=args.method_config,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        system_prompt=args.system_prompt,
        image_aspect=args.image_aspect,
        limit=args.limit,
    )


def add_pope_parser(benchmarks) -> None:
    parser = benchmarks.add_parser("pope", help="POPE yes/no object existence (accuracy, precision, recall, F1, yes-ratio)")
    parser.add_argument("--question-file", nargs="+", required=True,
                        help="official JSON-lines files, or lmms-lab/POPE parquet (file, folder or hub id)")
    parser.add_argument("--image-folder", help="COCO val2014 images (for JSON-lines question files)")
    parser.add_argument("--prompt", default=POPE_PROMPT, help="user message template with {question}")
    add_run_arguments(parser)
    parser.set_defaults(func=run_pope)


def check_folder(path: str | None, flag: str) -> None:
    """Refuse a data folder that is not there, naming the flag (the benchmark would name only the files missing in
    it)."""
    if path is not None and not Path(path).is_dir():
        raise UsageError(f"{flag} {path}: folder not found; pass the folder that holds the benchmark's files")


def run_pope(args: argparse.Namespace) -> None:
    for source in args.question_file:
        try:
            question_format(source)
        except FileNotFoundError:
            raise UsageError(f"--question-file {source}: no such file or folder; pass POPE's JSON-lines files, "
                             "lmms-lab/POPE parquet (a file or folder) or a hub dataset id (owner/name)") from None
    check_folder(args.image_folder, "--image-folder")
    evaluate_pope(args.question_file, args.image_folder, options_from_args(args), args.prompt)


def add_chair_parser(benchmarks) -> None:
    parser = benchmarks.add_parser("chair", help="CHAIR object hallucination in COCO image descriptions")
    parser.add_argument("--image-folder", required=True, help="COCO val2014 images")
    parser.add_argument("--annotations", required=True, help="folder with instances_val2014.json and captions_val2014.json")
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    parser.add_argument("--image-seed", type=int, default=0, help="seed of the image sample (recorded)")
    parser.add_argument("--image-ids", help="file with one COCO image id per line, instead of a seeded sample")
    parser.add_argument("--prompt", default=CHAIR_PROMPT)
    add_run_arguments(parser)
    parser.set_defaults(func=run_chair)


def run_chair(args: argparse.Namespace) -> None:
    check_folder(args.image_folder, "--image-folder")
    check_folder(args.annotations, "--annotations")
    if args.image_ids and not Path(args.image_ids).is_file():
        raise UsageError(f"--image-ids {args.image_ids}: file not found; pass a file with one COCO image id per line")
    image_ids = read_image_ids(args.image_ids) if args.image_ids else None
    evaluate_chair(
        args.image_folder,
        args.annotations,
        options_from_args(args),
        num_images=args.num_images,
        image_seed=args.image_seed,
        image_ids=image_ids,
        prompt=args.prompt,
    )


def add_mme_parser(benchmarks) -> None:
    parser = benchmarks.add_parser("mme", help="MME perception / cognition yes-no questions (acc, acc+, score)")
    parser.add_argument("--mme-root", required=True, help="MME_Benchmark_release_version/")
    parser.add_argument("--subtasks", nargs="+", default=list(SUBTASKS), choices=SUBTASKS, metavar="SUBTASK")
    parser.add_argument("--prompt", default=MME_PROMPT, help="user message template with {question}")
    add_run_arguments(parser)
    parser.set_defaults(func=run_mme)


def run_mme(args: argparse.Namespace) -> None:
    check_folder(args.mme_root, "--mme-root")
    evaluate_mme(args.mme_root, options_from_args(args), tuple(args.subtasks), args.prompt)


def add_shapesworld_parser(benchmarks) -> None:
    parser = benchmarks.add_parser("shapesworld", help="POPE / MME / CHAIR on held-out ShapesWorld scenes",
                                   description=shapesworld_evaluate.__doc__)
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id or shapesworld-smol (default: the embedded ShapesWorld model)")
    parser.add_argument("--config", default=None, help="generation (RCPP) preset: a shipped name or a YAML "
                        "path (default: vanilla greedy decoding)")
    add_method_arguments(parser)
    add_world_seed_argument(parser)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="default: runs/shapesworld_<split>_s<seed>")
    parser.set_defaults(func=run_shapesworld)


def run_shapesworld(args: argparse.Namespace) -> int:
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    method = load_method_preset(args.method, args.method_config)
    settings = EvalSettings(
        model=model_folder(args.model),
        split=args.split,
        config=args.config,
        method=None if method is None else method.to_dict(),
        seed=args.seed,
        num_images=args.num_images,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    output_dir = args.output_dir or f"runs/shapesworld_{args.split}_s{args.seed}"
    metrics = evaluate(settings, output_dir)
    print(json.dumps({k: v for k, v in metrics.items() if k != "run"}, indent=1))
    print(f"results in {output_dir}")
    return 0


BENCHMARKS = [add_pope_parser, add_chair_parser, add_mme_parser, add_shapesworld_parser]


def add_benchmark_parsers(parser: argparse.ArgumentParser) -> None:
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add_benchmark_parser in BENCHMARKS:
        add_benchmark_parser(benchmarks)


def add_parser(commands) -> None:
    parser = commands.add_parser("eval", help="run a benchmark (POPE, CHAIR, MME) into a resumable run directory")
    add_benchmark_parsers(parser)
