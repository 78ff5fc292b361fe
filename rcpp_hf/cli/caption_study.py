"""What the two-variant caption studies in the repository's `experiments/` share (`fastv_variants.py`,
`pdrop_positions.py`): a method's settings that fit the model, captions cut at their end token, position-by-position
token differences, and the command line that loads the model, runs every setting over the scenes and writes the
table. Each study writes only its own `measure` and `table`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from rcpp_hf.cli.options import model_folder
from rcpp_hf.methods import MethodConfig
from rcpp_hf.methods.budget import budget_label
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.caption_sets import caption_scenes
from rcpp_hf.shapesworld.compare import BUDGETS
from rcpp_hf.shapesworld.world import TEST_SEED


def token_differences(a: list[int], b: list[int]) -> tuple[int, int | None]:
    """(tokens that differ position by position, a missing one counting, first step at which they part or None)."""
    differ = [i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i]]
    return len(differ), (differ[0] if differ else None)


def end_ids(eos) -> set[int]:
    """A generation config's `eos_token_id` (an id, ids or None) as a set."""
    return {eos} if isinstance(eos, int) else set(eos or ())


def until_end(tokens: list[int], eos) -> list[int]:
    """`tokens` up to and including the first end-of-sequence token (`eos`: an id, ids or None)."""
    ends = end_ids(eos)
    stop = next((i for i, token in enumerate(tokens) if token in ends), None)
    return tokens if stop is None else tokens[: stop + 1]


def budget_settings(first: tuple[str, MethodConfig], make: Callable[[float], MethodConfig], num_layers: int,
                    num_visual: int) -> list[tuple[str, MethodConfig | None]]:  # fmt: skip
    """`first`, then `make(budget)` at each of compare's budgets: (label, method), or (label, None) for a budget the
    model cannot reach."""
    rows: list[tuple[str, MethodConfig | None]] = [first]
    for budget in BUDGETS:
        method = make(budget)
        try:
            method.check_fits(num_layers, num_visual)
        except ValueError:
            method = None
        rows.append((f"budget {budget_label(budget)}", method))
    return rows


def study_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python experiments/{name}.py", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--num-scenes", type=int, default=20, help="caption scenes of the world (default 20)")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help=f"the world (default {TEST_SEED}, the test world)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="caption length cap (default 64)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded ShapesWorld model)")
    parser.add_argument("--output-dir", default=None, help=f"also write {name}.md / .json there")
    return parser


def run_study(name: str, args: argparse.Namespace, settings: Callable, measure: Callable, table: Callable) -> int:
    """Load the model, run `measure(model, processor, scenes, method, max_new_tokens, vanilla)` for every setting
    `settings(num_layers, num_visual)` gives (`vanilla`: scene index -> the unpruned caption, shared by the settings),
    print `table(results)` and write it with the results to `--output-dir`."""
    folder = model_folder(args.model)
    model = RCPPLlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    scenes = caption_scenes(args.seed, args.num_scenes)
    num_layers, num_visual = model.config.text_config.num_hidden_layers, model.config.image_seq_length
    vanilla: dict[int, list[int]] = {}
    results = []
    with torch.inference_mode():
        for label, method in tqdm(settings(num_layers, num_visual), desc="settings"):
            if method is None:
                results.append({"setting": label, "skipped": f"unreachable on {num_layers} layers"})
                continue
            results.append({"setting": label, **measure(model, processor, scenes, method, args.max_new_tokens,
                                                        vanilla)})  # fmt: skip
    text = table(results)
    print(f"{folder}: {num_layers} decoder layers, {num_visual} visual tokens; world {args.seed}, "
          f"{len(scenes)} caption scenes, greedy, max {args.max_new_tokens} new tokens\n")
    print(text)
    if args.output_dir:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / f"{name}.md").write_text(text)
        (output / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0
