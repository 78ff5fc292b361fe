"""The demo (`rcpp-hf demo`, `rcpp_hf.cli.demo`): the embedded ShapesWorld model on a bundled scene, original vs RCPP + DRCD.

Prints the scene's true objects, the original (vanilla greedy) caption and the RCPP + DRCD caption,
each with the kinds it names that are not in the image and those it leaves out, and writes a PNG that shows, at a few
decoding steps, which image patches were core evidence (C: S >= tau), noise (N: S < tau) or
evicted from the KV cache.

The demo runs the `rcpp_evict` preset (`DEMO_PRESET`): the visual KV budget falls from the first step, as in
the method's description, so the method acts within a ShapesWorld caption (about 20 tokens). The library
defaults (`rcpp_default`) act later: the validation sweep that chose them (lowest CHAIR_I at greedy's recall)
picked `schedule: step`, which holds lambda at 0 and keeps every visual token until step 32, so on a caption
this short they change nothing (`rcpp-hf demo --config rcpp_default` shows it).

The bundled scene is scene `DEMO_SCENE_INDEX` of the test world, "a blue star above a white square,
a small white triangle and a small green bolt": a star without its moon, the kind of scene where the
language prior pulls a caption towards "moon".
"""

from __future__ import annotations

import copy

import torch
from matplotlib.figure import Figure  # not pyplot: no backend to choose, in a terminal or a notebook

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.shapesworld.captions import mentioned_kinds
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt
from rcpp_hf.shapesworld.world import TEST_SEED, Scene, sample_scene
from rcpp_hf.rcpp.stages import group_visual_tokens
from rcpp_hf.rcpp.trace import RCPPStep, RCPPTrace

DEMO_SCENE_INDEX = 166
DEMO_PRESET = "rcpp_evict"
CORE, NOISE, EVICTED = 0, 1, 2
_STATE_COLOURS = {CORE: (0.1, 0.8, 0.2, 0.25), NOISE: (0.95, 0.15, 0.1, 0.45), EVICTED: (0.0, 0.0, 0.0, 0.8)}


def demo_scene() -> Scene:
    return sample_scene(TEST_SEED, DEMO_SCENE_INDEX)


def patch_states(step: RCPPStep, tau: float, row: int = 0, tau_mode: str = "absolute") -> torch.Tensor:
    """(V,) state of every visual token after `step`: CORE (S >= the threshold tau sets, `tau_mode`), NOISE (below
    it) or EVICTED (S is NaN, left out of a relative threshold)."""
    scores = step.scores[row : row + 1].float()
    states = torch.where(group_visual_tokens(scores, tau, tau_mode)[0], CORE, NOISE)
    return torch.where(scores[0].isnan(), EVICTED, states)


def settings_line(config: RCPPGenerationConfig) -> str:
    """RCPP + DRCD's settings in one line, as the demo prints them and titles its figure."""
    schedule = f"{config.schedule} over {config.schedule_steps} steps"
    return (f"tau {config.tau:g} ({config.tau_mode}), lambda {config.lambda_start:g} -> {config.lambda_end:g}, "
            f"visual KV kept {config.keep_ratio_start:g} -> {config.keep_ratio_end:g}, {schedule}")  # fmt: skip


def patch_state_figure(image, trace: RCPPTrace, tau: float, steps: list[int], tau_mode: str = "absolute",
                       title: str = "") -> Figure:  # fmt: skip
    """One panel per step of `steps`: the image with its patches coloured core / noise / evicted; `title` (the
    settings) above the legend."""
    side = int(trace.num_visual_tokens**0.5)
    if side * side != trace.num_visual_tokens:
        raise ValueError(f"{trace.num_visual_tokens} visual tokens do not form a square grid of patches")
    figure = Figure(figsize=(3 * len(steps), 3.6))
    axes = figure.subplots(1, len(steps), squeeze=False)
    for axis, index in zip(axes[0], steps):
        step = trace.steps[index]
        states = patch_states(step, tau, tau_mode=tau_mode)
        overlay = torch.tensor([_STATE_COLOURS[int(s)] for s in states]).view(side, side, 4)
        axis.imshow(image)
        axis.imshow(overlay.numpy(), extent=(0, image.width, image.height, 0), interpolation="nearest")
        counts = [int((states == s).sum()) for s in (CORE, NOISE, EVICTED)]
        axis.set_title(f"step {step.step}: C {counts[0]}, N {counts[1]}, evicted {counts[2]}", fontsize=9)
        axis.axis("off")
    legend = "green: core (S >= tau)   red: noise (S < tau)   black: evicted"
    figure.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    figure.tight_layout()
    return figure


def demo_steps(trace: RCPPTrace, panels: int = 4) -> list[int]:
    """The decoding steps the demo shows: `panels` steps evenly spread from the first decoded step to the last."""
    last = len(trace.steps) - 1
    return sorted({round(min(1, last) + i * (last - min(1, last)) / max(panels - 1, 1)) for i in range(panels)})


def caption_both_ways(model, processor, image, generation_config: RCPPGenerationConfig):
    """(original caption, RCPP + DRCD caption, the RCPP run's trace) for one image, greedy unless configured."""
    inputs = processor(images=image, text=chat_prompt(processor, CAPTION_PROMPT), return_tensors="pt")
    vanilla_config = copy.deepcopy(generation_config)
    vanilla_config.rcpp = False  # the model's own loop: exactly LlavaForConditionalGeneration.generate
    captions = []
    with torch.inference_mode():
        for config in (vanilla_config, generation_config):
            out = model.generate(**inputs, generation_config=config)
            new = out.sequences[0, inputs["input_ids"].shape[1] :]
            captions.append(processor.decode(new, skip_special_tokens=True).strip())
    return captions[0], captions[1], out.rcpp


def with_absent_kinds(caption: str, scene: Scene) -> str:
    """The caption and, below it, the kinds it names that are not in the scene and the scene's kinds it leaves out."""
    named = set(mentioned_kinds(caption))
    wrong, missed = sorted(named - set(scene.kinds)), sorted(set(scene.kinds) - named)
    return (f"{caption}\n    names absent: {', '.join(wrong) if wrong else 'nothing'}; "
            f"leaves out: {', '.join(missed) if missed else 'nothing'}")  # fmt: skip
