"""`rcpp-hf gan-pruner match`: the comparison's controls (random pruning, FastV) at the GAN pruner's own token counts.

The trained pruners decide how many tokens stay per input, so their budget is measured, not set: each prompt of a
held-out set (the validation world's adversarial POPE questions and caption requests) is prefilled alone (batch 1,
so the count is exactly the masks' count) and the kept tokens per stage are averaged. From those counts:
  - random pruning at the same layers and the same (rounded mean) counts: what the learned choice adds over chance;
  - FastV at the pruner's first layer with the same average number of visual tokens per layer (the equivalent budget
    of `engine/pruning.py`): an attention ranking at the same compute.
Each is written as a registry preset beside the GAN pruner's own, named after the pruners' folder (`gan_128.yaml`,
`gan_128_random.yaml`, `gan_128_fastv.yaml` for pruners in `gan_128/`), for `rcpp-hf shapesworld compare --configs
...`, which names its rows after the files. `--mode top_k` does the same for the pruners' "top_k" mode (exactly the
trained share per stage; the files get `_top_k` after the folder's name): there the counts are known in advance, and
a few prompts measure them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoProcessor

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.pruning import visual_tokens_per_layer
from rcpp_hf.methods import FastV, RandomPruning
from rcpp_hf.methods.gan_pruner.method import GanPruner
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.caption_sets import caption_scenes
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt, pope_prompt
from rcpp_hf.shapesworld.pope_sets import build_pope_questions, pope_scenes
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.world import VALIDATION_SEED

COUNTS_FILE = "counts.json"


def matching_prompts(seed: int, num_images: int) -> list[tuple[object, str]]:
    """(scene, user text) pairs: every adversarial POPE question and one caption request per scene."""
    scenes = {s.image_file: s for s in pope_scenes(seed, num_images)}
    questions = [(scenes[row["image"]], pope_prompt(row["text"])) for row in build_pope_questions(list(scenes.values()), "adversarial")]
    return questions + [(scene, CAPTION_PROMPT) for scene in caption_scenes(seed, num_images)]


@torch.inference_mode()
def measure_counts(model_dir: str | Path, pruner_path: str | Path, seed: int, num_images: int, progress: bool = True,
                   mode: str = "hard") -> dict:  # fmt: skip
    """Mean visual tokens kept per stage over `matching_prompts`, each prefilled alone, with the pruners in `mode`;
    also the mean visual tokens per decoder layer (the equivalent budget)."""
    model = RCPPLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    method = GanPruner(pruner_path=str(pruner_path), mode=mode)
    config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=1, do_sample=False,
                                  return_dict_in_generate=True)  # fmt: skip
    num_layers = model.config.text_config.num_hidden_layers
    totals, per_layer, prompts = None, 0.0, matching_prompts(seed, num_images)
    for scene, text in tqdm(prompts, desc="gan-pruner counts", disable=not progress):
        inputs = processor(images=render_scene(scene), text=chat_prompt(processor, text), return_tensors="pt")
        records = model.generate(**inputs, generation_config=config).pruning
        num_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        kept = [record.kept for record in records]
        totals = kept if totals is None else [a + b for a, b in zip(totals, kept, strict=True)]
        per_layer += sum(visual_tokens_per_layer({r.layer: r.kept for r in records}, num_layers, num_visual)) / num_layers
    return {"layers": [r.layer for r in records], "mean_kept": [t / len(prompts) for t in totals],
            "visual_tokens_per_layer": per_layer / len(prompts), "num_visual": num_visual, "num_layers": num_layers,
            "prompts": len(prompts), "seed": seed, "num_images": num_images}  # fmt: skip


def matched_baselines(counts: dict, seed: int = 0) -> dict[str, object]:
    """The registry configs matched to `counts` (`measure_counts`): {"random": ..., "fastv": ...}."""
    keep = [max(1, round(k)) for k in counts["mean_kept"]]
    for i in range(1, len(keep)):  # rounding must not make a later stage keep more
        keep[i] = min(keep[i], keep[i - 1])
    return {
        "random": RandomPruning(layers=tuple(counts["layers"]), keep=tuple(keep), seed=seed),
        "fastv": FastV(budget=max(1, round(counts["visual_tokens_per_layer"])), layer=counts["layers"][0]),
    }


def write_presets(model_dir, pruner_path, output_dir, seed: int = VALIDATION_SEED, num_images: int = 50,
                  progress: bool = True, mode: str = "hard") -> dict:  # fmt: skip
    """Measure, then write `counts.json` (`counts_top_k.json` in "top_k" mode) and the three presets
    (`<label>.yaml`, `<label>_random.yaml`, `<label>_fastv.yaml`, label = the pruners' folder name, plus `_top_k` in
    that mode) into `output_dir`; returns the counts."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = measure_counts(model_dir, pruner_path, seed, num_images, progress, mode)
    suffix = "" if mode == "hard" else f"_{mode}"
    (output_dir / f"{Path(COUNTS_FILE).stem}{suffix}.json").write_text(json.dumps(counts, indent=1) + "\n")
    label = Path(pruner_path).resolve().name + suffix
    GanPruner(pruner_path=str(Path(pruner_path).resolve()), mode=mode).to_yaml(output_dir / f"{label}.yaml")
    for name, method in matched_baselines(counts).items():
        method.to_yaml(output_dir / f"{label}_{name}.yaml")
    return counts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("match", help="presets of random pruning and FastV at the trained pruners' counts",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="the LLaVA checkpoint the pruners were trained on: a folder, "
                        "a hub id (org/name) or shapesworld-smol")
    parser.add_argument("--pruners", required=True, help="folder written by `rcpp-hf gan-pruner train`")
    parser.add_argument("--output-dir", required=True, help="where counts.json and the three presets go")
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED, help="world seed of the prompts (validation: 1)")
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--mode", choices=("hard", "top_k"), default="hard", help="the pruners' evaluation mode")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    counts = write_presets(args.model, args.pruners, args.output_dir, args.seed, args.num_images, mode=args.mode)
    print(f"kept per stage (layers {counts['layers']}): {[round(k, 1) for k in counts['mean_kept']]} of "
          f"{counts['num_visual']}; visual tokens per layer {counts['visual_tokens_per_layer']:.1f}; presets in {args.output_dir}")
    return 0
