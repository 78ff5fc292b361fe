"""LLaVA-NeXT's newline tokens: pruned like every visual token (rcpp_hf's choice, docs/families.md) or always kept.

On the tiny LLaVA-NeXT of `rcpp_hf.tiny_families` (random weights, drawn with std 0.3 so that outputs depend on the
image), FastV keeps R of each image's tokens from layer 1 on. "pruned" is FastV as shipped: a newline token is
ranked like any other visual token. "kept" ranks the same attention but keeps every newline first, so that only
patch tokens compete for the remaining R - (newlines) places. For each choice and keep share the script reports
how many newline tokens stay and how far the first token's logits move from the unpruned model's (mean absolute
difference, and whether the greedy token changes), over images of several sizes. Random weights measure the
mechanism, not quality.

    python experiments/newline_tokens.py            # prints the table
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, GenerationConfig

import rcpp_hf
from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.engine.pruning import PruneContext
from rcpp_hf.methods import FastV
from rcpp_hf.tiny_families import load_tiny_processor, save_tiny_family

SIZES = [(24, 40), (40, 24), (32, 32), (30, 40), (40, 30), (64, 20), (20, 64), (16, 16)]
PROMPT = "USER: <image>\nDescribe the image in detail please. ASSISTANT:"


@dataclass
class FastVKeepingNewlines(FastV):
    """FastV, with every newline token (an entry of the decoder input equal to `image_newline`) ranked first."""

    newline: torch.Tensor | None = None

    def score(self, ctx: PruneContext) -> torch.Tensor:
        scores = super().score(ctx)
        prompt_slots = ctx.prompt_layout.visual_slots.gather(1, ctx.layout.visual_token_ids)
        embeds = ctx.inputs_embeds.gather(1, prompt_slots[:, :, None].expand(-1, -1, ctx.inputs_embeds.shape[-1]))
        is_newline = (embeds == self.newline.to(embeds.dtype)).all(dim=-1)
        return torch.where(is_newline, scores.max() + 1.0, scores)


def first_logits(model, inputs, method=None):
    """The first generated token's logits (vocab,) and the pruning records, with `method` or none."""
    if method is None:
        config = GenerationConfig(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    else:
        config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=1, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True)  # fmt: skip
    out = model.generate(**inputs, generation_config=config)
    return out.logits[0][0], getattr(out, "pruning", [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    folder = save_tiny_family(tempfile.mkdtemp(), "llava_next")
    varied = AutoModelForImageTextToText.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in varied.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    varied.save_pretrained(folder)
    model = rcpp_hf.from_pretrained(folder).eval()
    processor = load_tiny_processor(folder, model.config)
    newline = model.model.image_newline.detach()
    image_token = model.config.image_token_id

    images = [Image.fromarray(torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy())
              for size in SIZES]  # fmt: skip
    print("| keep share | newlines | newlines kept / all | mean abs logit change | greedy token changed |")
    print("|---|---|---|---|---|")
    for share in args.shares:
        choices = (("pruned", FastV(keep=share)), ("kept", FastVKeepingNewlines(keep=share, newline=newline)))
        for label, method in choices:
            kept_newlines = total_newlines = changed = 0
            differences = []
            for image_file in images:
                inputs = processor(images=image_file, text=PROMPT, return_tensors="pt")
                with torch.no_grad():
                    embeds = model.family.embed_prompt(inputs["input_ids"], dict(inputs))
                is_newline = (embeds[0][inputs["input_ids"][0] == image_token] == newline).all(dim=-1)  # (V,)
                reference, _ = first_logits(model, inputs)
                logits, records = first_logits(model, inputs, method)
                kept = records[-1].kept_visual_ids[0]
                kept_newlines += int(is_newline[kept].sum())
                total_newlines += int(is_newline.sum())
                differences.append(float((logits - reference).abs().mean()))
                changed += int(logits.argmax() != reference.argmax())
            mean_difference = sum(differences) / len(differences)
            print(f"| {share} | {label} | {kept_newlines} / {total_newlines} | {mean_difference:.4f} | "
                  f"{changed} of {len(SIZES)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
