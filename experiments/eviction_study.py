"""The question the demo raises: are an object's patches evicted before the caption names it, and does that cost
recall? RCPP + DRCD with the method's original values (below) on the embedded model, test-world caption scenes,
batch 1.

For each object of each scene: its patches (the 16 px patches its pixels cover at least 1/8 of, from the renderer's
object map, as the training probe defines them), the first decoding step at which one of them was evicted, and the
step at which its kind is first named (the tokenizer spends one token per word). Prints the shares and the recall of
objects by whether eviction came first. Run: `python experiments/eviction_study.py [NUM_SCENES]`.
"""

import json
import sys

import torch
from transformers import AutoProcessor

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.default_model import default_model_path
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.shapesworld.caption_sets import caption_scenes
from rcpp_hf.shapesworld.captions import mentioned_kinds
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.train import patch_targets
from rcpp_hf.shapesworld.world import KINDS, TEST_SEED


def first_mention_steps(processor, tokens: list[int]) -> dict[str, int]:
    """kind -> the decoding step whose token completes its first mention."""
    steps = {}
    for step in range(len(tokens)):
        for kind in mentioned_kinds(processor.tokenizer.decode(tokens[: step + 1], skip_special_tokens=True)):
            steps.setdefault(kind, step)
    return steps


def main(num_scenes: int = 40) -> dict:
    folder = default_model_path()
    model = RCPPLlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    # The method's original values (the defaults before experiments/defaults_sweep.py chose tau -0.05 and the step
    # schedule): eviction ramps in from step 1.
    config = RCPPGenerationConfig(tau=0.0, schedule="linear", max_new_tokens=64, return_dict_in_generate=True)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kinds_index = {kind: 1 + i for i, kind in enumerate(KINDS)}
    counts = {"objects": 0, "evicted_before_mention": 0, "never_mentioned": 0, "evicted_first_named": 0,
              "kept_first_named": 0, "kept_first": 0, "repeated_captions": 0, "vanilla_repeated_captions": 0}
    for scene in caption_scenes(TEST_SEED, num_scenes):
        inputs = processor(images=render_scene(scene), text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
        out = model.generate(**inputs, generation_config=config)
        vanilla = model.generate(**inputs, max_new_tokens=64, do_sample=False)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        mentions = first_mention_steps(processor, tokens)
        caption = processor.tokenizer.decode(tokens, skip_special_tokens=True)
        plain = processor.tokenizer.decode(vanilla[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        counts["repeated_captions"] += len(mentioned_kinds(caption)) != len(set(mentioned_kinds(caption)))
        counts["vanilla_repeated_captions"] += len(mentioned_kinds(plain)) != len(set(mentioned_kinds(plain)))
        evicted_at = torch.full((side * side,), 10**6)
        for step in out.rcpp.steps:
            for index in step.evicted[0].tolist():
                evicted_at[index] = min(int(evicted_at[index]), step.step)
        kind_map = patch_targets([scene], side)[0][0]
        for kind in scene.kinds:
            patches = (kind_map == kinds_index[kind]).nonzero().flatten()
            first_eviction = int(evicted_at[patches].min()) if len(patches) else 10**6
            named = mentions.get(kind)
            counts["objects"] += 1
            counts["never_mentioned"] += named is None
            evicted_first = first_eviction < (named if named is not None else 10**6)
            counts["evicted_before_mention"] += evicted_first
            counts["evicted_first_named" if evicted_first else "kept_first_named"] += named is not None
            counts["kept_first"] += not evicted_first
    kinds_evicted_first = counts["evicted_before_mention"]
    summary = {
        **counts,
        "share_evicted_before_mention": kinds_evicted_first / counts["objects"],
        "recall_when_evicted_first": counts["evicted_first_named"] / max(kinds_evicted_first, 1),
        "recall_when_kept_until_named": counts["kept_first_named"] / max(counts["kept_first"], 1),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
