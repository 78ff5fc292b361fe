"""PDrop's positions option on ShapesWorld: how far "renumbered" (PyramidDrop's official code: the kept tokens
renumbered 0, 1, ... after each drop, decoded tokens following them) moves the kept tokens and the captions away from
"original" (the library's default: every kept token at its original position).

    python experiments/pdrop_positions.py [--num-scenes 20] [--seed 2] [--max-new-tokens 64] [--model FOLDER]
                                          [--output-dir DIR]

For each PDrop setting (its published ratios 0.5 / 0.25 / 0.125, then each budget of `compare`'s 0.1111 / 0.2222 /
0.3333 that the model can reach; layers scaled by depth) and each caption scene of the world `--seed` (batch 1,
greedy, CHAIR's caption prompt), three captions: PDrop with positions "original", with "renumbered", and the model
without pruning. Reported per setting:
  - per stage, the kept visual tokens that differ between the two (mean over scenes, of the stage's kept count); the
    first stage ranks before any renumbering, so it keeps the same tokens by construction;
  - captions identical between "original" and "renumbered", the mean first step at which the others part, and the
    generated tokens that differ, position by position (a token one caption has and the other lacks counts as
    different), over all generated tokens of "original";
  - for scale, the same caption figures between each of the two and no pruning.
Prints a markdown table; with --output-dir also writes pdrop_positions.md and pdrop_positions.json there.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from tqdm.auto import tqdm

from rcpp_hf.cli.caption_study import budget_settings, run_study, study_parser, token_differences, until_end
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.methods import PDrop
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt
from rcpp_hf.shapesworld.render import render_scene

NAME = "pdrop_positions"


def settings(num_layers: int, num_visual: int) -> list[tuple[str, PDrop | None]]:
    """The PDrop settings that fit the model: (label, method), or (label, None) for one it cannot reach."""
    return budget_settings(("ratios 0.5/0.25/0.125", PDrop()), lambda b: PDrop(budget=b), num_layers, num_visual)


def generated(out, prompt_len: int, eos) -> list[int]:
    """The generated tokens of row 0, up to and including its first end-of-sequence token."""
    return until_end(out.sequences[0, prompt_len:].tolist(), eos)


def measure(model, processor, scenes, method: PDrop, max_new_tokens: int, vanilla: dict) -> dict:
    """Every figure of one setting over `scenes` (`vanilla`: scene index -> the unpruned caption's tokens)."""
    eos = model.generation_config.eos_token_id
    num_visual = model.config.image_seq_length
    stages = method.resolve_stages(model.config.text_config.num_hidden_layers, num_visual)
    kept_differ = [0] * len(stages)
    same = differing_tokens = total_tokens = 0
    first_steps = []
    vanilla_same, vanilla_differing = {"original": 0, "renumbered": 0}, {"original": 0, "renumbered": 0}
    for index, scene in enumerate(tqdm(scenes, desc=method.describe(), leave=False)):
        inputs = processor(images=render_scene(scene), text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
        runs = {}
        for positions in ("original", "renumbered"):
            config = RCPPGenerationConfig(rcpp=False, methods=[replace(method, positions=positions)],
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          return_dict_in_generate=True)  # fmt: skip
            runs[positions] = model.generate(**inputs, generation_config=config)
        kept = {positions: {record.layer: set(record.kept_visual_ids[0].tolist()) for record in out.pruning}
                for positions, out in runs.items()}  # fmt: skip
        for stage, layer in enumerate(s.layer for s in stages):
            if layer in kept["original"]:  # a stage that would keep every token does not run
                kept_differ[stage] += len(kept["original"][layer] - kept["renumbered"][layer])
        original = generated(runs["original"], prompt_len, eos)
        renumbered = generated(runs["renumbered"], prompt_len, eos)
        count, first = token_differences(original, renumbered)
        same += count == 0
        differing_tokens += count
        total_tokens += len(original)
        if first is not None:
            first_steps.append(first)
        if index not in vanilla:
            plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   return_dict_in_generate=True)  # fmt: skip
            vanilla[index] = generated(plain, prompt_len, eos)
        for positions, tokens in (("original", original), ("renumbered", renumbered)):
            count, _ = token_differences(tokens, vanilla[index])
            vanilla_same[positions] += count == 0
            vanilla_differing[positions] += count
    scenes_count = len(scenes)
    per_stage = [{"layer": s.layer, "kept": s.keep, "kept_differing": kept_differ[i] / scenes_count}
                 for i, s in enumerate(stages)]  # fmt: skip
    return {
        "stages": per_stage,
        "identical_captions": same,
        "scenes": scenes_count,
        "mean_first_divergence": sum(first_steps) / len(first_steps) if first_steps else None,
        "differing_tokens": differing_tokens,
        "generated_tokens": total_tokens,
        "vanilla_identical_captions": vanilla_same,
        "vanilla_differing_tokens": vanilla_differing,
    }


def table(results: list[dict]) -> str:
    """The markdown table of `main`'s results."""
    header = ("| setting | stages (layer: kept) | kept tokens differing per stage | identical captions | "
              "first divergence (mean step) | generated tokens differing | vs no pruning, original: identical, "
              "tokens differing | vs no pruning, renumbered: identical, tokens differing |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in results:
        if row.get("skipped"):
            lines.append(f"| {row['setting']} | skipped: {row['skipped']} |||||||")
            continue
        stages = ", ".join(f"{s['layer']}: {s['kept']}" for s in row["stages"])
        kept = ", ".join(f"{s['kept_differing']:.2f}" for s in row["stages"])
        first = "-" if row["mean_first_divergence"] is None else f"{row['mean_first_divergence']:.1f}"
        lines.append(
            f"| {row['setting']} | {stages} | {kept} | {row['identical_captions']} / {row['scenes']} | {first} | "
            f"{row['differing_tokens']} / {row['generated_tokens']} | "
            + " | ".join(f"{row['vanilla_identical_captions'][p]} / {row['scenes']}, {row['vanilla_differing_tokens'][p]}"
                         for p in ("original", "renumbered")) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_study(NAME, study_parser(NAME, __doc__).parse_args(argv), settings, measure, table)


if __name__ == "__main__":
    sys.exit(main())
