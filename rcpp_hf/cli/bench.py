"""`rcpp-hf bench`: the speed and memory benchmark from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rcpp_hf.benchmark.model_sizes import GPU_ONLY, SHAPES
from rcpp_hf.benchmark.suite import (
    DEFAULT_METHODS,
    WITH_RCPP,
    BenchmarkSettings,
    format_report,
    known_methods,
    plot_report,
    run_speed_benchmark,
)
from rcpp_hf.cli.errors import UsageError
from rcpp_hf.cli.options import BUDGET_HELP, budget_argument, check_device, model_folder
from rcpp_hf.methods import METHODS as REGISTRY
from rcpp_hf.run_config import read_method_yaml


def add_parser(commands) -> None:
    parser = commands.add_parser("bench", help="speed and memory of RCPP + DRCD beside vanilla and a two-pass "
                                               "contrastive reference (VCD)")
    parser.add_argument("--shape", default="small", help=f"{' | '.join(SHAPES)}, random weights (small: "
                        "LLaVA-1.5's layout scaled down, 576 visual tokens; 7b-width: LLaVA-1.5-7B's widths and "
                        "vision tower with 8 decoder layers, for a CPU; 7b: the whole model, CUDA only; next-small: "
                        "LLaVA-NeXT's anyres layout, a 672 x 672 image of 2,928 visual tokens, small widths; "
                        "next-7b: llava-v1.6-vicuna-7b, CUDA only; qwen-small: Qwen2.5-VL's processor, a 672 x 672 "
                        "image of 576 visual tokens, small widths; qwen-7b: Qwen2.5-VL-7B, CUDA only); ignored with "
                        "--model")
    parser.add_argument("--model", help="checkpoint folder or hub id instead of a shape")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {','.join(known_methods())} (registry methods run alone, greedy; "
                        "'<name>+rcpp' composes one with the 'rcpp' setting; a contrastive "
                        "decoder runs only alone)")
    parser.add_argument("--method-config", action="append", default=[], help="YAML preset of a registry method in "
                        "--methods ('method' key; without it: settings of the only one); repeat for several; its "
                        "budget follows --budget's rule")
    parser.add_argument("--budget", type=budget_argument, default=BenchmarkSettings.budget,
                        help=f"budget of the registry methods with a budget setting, unless a --method-config sets "
                             f"one (the same rule): {BUDGET_HELP}; a budget a method cannot reach on the model is a "
                             "skipped row (default: 0.2222, 128 of 576)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="float32 | float16 | bfloat16 (default: float16 for 7b, next-7b and qwen-7b, "
                        "else float32)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 keeps timings "
                        "steady on a machine shared with other work")
    parser.add_argument("--output", type=Path, help="write the report as JSON")
    parser.add_argument("--plot", type=Path, help="write per-token time and cache bytes against the step (PNG)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The checks that need no model run first; BenchmarkSettings checks the rest (methods, counts, dtype).
    if args.model is None and args.shape not in SHAPES:
        raise UsageError(f"--shape {args.shape}: unknown; choose one of {', '.join(SHAPES)}, or give --model")
    check_device(args.device)
    model = None if args.model is None else model_folder(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    registered = {m.removesuffix(WITH_RCPP) for m in methods} & set(REGISTRY)
    only = next(iter(registered)) if len(registered) == 1 else None
    settings = BenchmarkSettings(
        shape=args.shape,
        model=model,
        methods=methods,
        budget=args.budget,
        method_presets=tuple(read_method_yaml(path, only) for path in args.method_config),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype or ("float16" if args.shape in GPU_ONLY and not args.model else "float32"),
    )
    report = run_speed_benchmark(settings)
    print(format_report(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_report(report, args.plot)
    return 0
