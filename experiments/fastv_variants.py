"""FastV's two variants on ShapesWorld: the KV-cache one the library follows, against the original one that re-prunes
at every forward.

    python experiments/fastv_variants.py [--num-scenes 20] [--seed 2] [--max-new-tokens 64] [--model FOLDER]
                                         [--output-dir DIR]

pkunlp-icler/FastV ships both in its modified `LlamaModel.fastv_forward`. With `use_cache=True` (its "Support KV
Cache" section; rcpp_hf's `fastv`) the image tokens are pruned once, in the prompt's forward, and every decoded token
attends to what each layer cached. With `use_cache=False` (the original method, the paper's and its latency
script's) every step runs the whole sequence (prompt and the tokens generated so far) again, and at layer K the image
tokens are chosen anew by the attention that the sequence's last token, the newest one, gives them at layer K - 1.

The reference for the second is built from the library's own FastV: each step is one `generate` call with
`max_new_tokens=1` over the whole sequence so far, without cache, whose prompt forward prunes with the attention of
its last entry (`query="last"`), then the greedy token is appended. The first token is the same in both variants by
construction (the same prompt forward).

For each setting (FastV's paper setting R = 50 % of the image at K = 2 of 32, then each budget of `compare`'s 0.1111
/ 0.2222 / 0.3333 that the model can reach) and each caption scene of the world `--seed` (batch 1, greedy, CHAIR's
caption prompt): captions identical between the variants, the mean first step at which the others part, the generated
tokens that differ (position by position, a token one caption has and the other lacks counting as different) over
all generated tokens of the KV-cache variant, and, in the re-pruning variant, the share of the kept image tokens that
are not among those the prompt's forward kept (mean over its steps after the first); for scale, each variant's
identical captions and differing tokens against the model without pruning. Prints a markdown table; with
--output-dir also writes fastv_variants.md and fastv_variants.json there.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from rcpp_hf.cli.caption_study import budget_settings, end_ids, run_study, study_parser, token_differences, until_end
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.methods import FastV
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt
from rcpp_hf.shapesworld.render import render_scene

NAME = "fastv_variants"
PAPER_KEEP = 0.5  # R = 50 % of the image at K = 2: the FastV paper's main setting


def settings(num_layers: int, num_visual: int) -> list[tuple[str, FastV | None]]:
    """The FastV settings that fit the model: (label, method), or (label, None) for one it cannot reach."""
    return budget_settings((f"keep {PAPER_KEEP} (paper)", FastV(keep=PAPER_KEEP)), lambda b: FastV(budget=b),
                           num_layers, num_visual)  # fmt: skip


def kept_ids(out) -> set[int] | None:
    """The visual ids row 0 kept, or None when the stage kept every token (it then does not run)."""
    return set(out.pruning[0].kept_visual_ids[0].tolist()) if out.pruning else None


def kv_cache_caption(model, inputs, method: FastV, max_new_tokens: int) -> tuple[list[int], set[int]]:
    """The library's FastV: pruned once in the prompt's forward -> (generated tokens up to eos, kept visual ids)."""
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=max_new_tokens, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    out = model.generate(**inputs, generation_config=config)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return until_end(tokens, model.generation_config.eos_token_id), kept_ids(out)


def re_pruning_caption(model, inputs, method: FastV, max_new_tokens: int) -> tuple[list[int], list[set[int]]]:
    """FastV's original variant: each step a forward of the whole sequence without cache, pruned at layer K by the
    attention of its last token -> (generated tokens up to eos, the kept visual ids of every step)."""
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=1, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    ends = end_ids(model.generation_config.eos_token_id)
    input_ids, tokens, kept = inputs["input_ids"], [], []
    for _ in range(max_new_tokens):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             pixel_values=inputs["pixel_values"], generation_config=config)  # fmt: skip
        token = int(out.sequences[0, -1])
        tokens.append(token)
        kept.append(kept_ids(out))
        if token in ends:
            break
        input_ids = out.sequences
    return tokens, kept


def measure(model, processor, scenes, method: FastV, max_new_tokens: int, vanilla: dict) -> dict:
    """Every figure of one setting over `scenes` (`vanilla`: scene index -> the unpruned caption's tokens)."""
    num_layers, num_visual = model.config.text_config.num_hidden_layers, model.config.image_seq_length
    stage = method.resolve_stages(num_layers, num_visual)[0]
    same = differing = total = 0
    first_steps, moved_shares = [], []
    vanilla_same, vanilla_differing = {"kv_cache": 0, "re_pruning": 0}, {"kv_cache": 0, "re_pruning": 0}
    for index, scene in enumerate(tqdm(scenes, desc=method.describe(), leave=False)):
        inputs = processor(images=render_scene(scene), text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
        cached, prompt_kept = kv_cache_caption(model, inputs, method, max_new_tokens)
        repruned, kept = re_pruning_caption(model, inputs, method, max_new_tokens)
        if kept[0] != prompt_kept or repruned[0] != cached[0]:
            raise AssertionError("the two variants' prompt forwards differ; they are the same forward")
        count, first = token_differences(cached, repruned)
        same += count == 0
        differing += count
        total += len(cached)
        if first is not None:
            first_steps.append(first)
        if kept[0] is not None:
            moved_shares += [len(step - kept[0]) / stage.keep for step in kept[1:]]
        if index not in vanilla:
            plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            vanilla[index] = until_end(plain[0, inputs["input_ids"].shape[1]:].tolist(),
                                       model.generation_config.eos_token_id)
        for variant, tokens in (("kv_cache", cached), ("re_pruning", repruned)):
            count, _ = token_differences(tokens, vanilla[index])
            vanilla_same[variant] += count == 0
            vanilla_differing[variant] += count
    return {
        "layer": stage.layer,
        "keep": stage.keep,
        "identical_captions": same,
        "scenes": len(scenes),
        "mean_first_divergence": sum(first_steps) / len(first_steps) if first_steps else None,
        "differing_tokens": differing,
        "generated_tokens": total,
        "kept_moved_share": sum(moved_shares) / len(moved_shares) if moved_shares else 0.0,
        "vanilla_identical_captions": vanilla_same,
        "vanilla_differing_tokens": vanilla_differing,
    }


def table(results: list[dict]) -> str:
    """The markdown table of `main`'s results."""
    header = ("| setting | K: R | identical captions | first divergence (mean step) | generated tokens differing | "
              "re-pruning: kept tokens not kept at the prompt | vs no pruning, KV cache: identical, tokens "
              "differing | vs no pruning, re-pruning: identical, tokens differing |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in results:
        if row.get("skipped"):
            lines.append(f"| {row['setting']} | skipped: {row['skipped']} |||||||")
            continue
        first = "-" if row["mean_first_divergence"] is None else f"{row['mean_first_divergence']:.1f}"
        lines.append(
            f"| {row['setting']} | {row['layer']}: {row['keep']} | {row['identical_captions']} / {row['scenes']} | "
            f"{first} | {row['differing_tokens']} / {row['generated_tokens']} | {row['kept_moved_share']:.1%} | "
            + " | ".join(f"{row['vanilla_identical_captions'][v]} / {row['scenes']}, {row['vanilla_differing_tokens'][v]}"
                         for v in ("kv_cache", "re_pruning")) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return run_study(NAME, study_parser(NAME, __doc__).parse_args(argv), settings, measure, table)


if __name__ == "__main__":
    sys.exit(main())
