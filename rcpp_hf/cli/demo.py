"""`rcpp-hf demo`: the embedded ShapesWorld model on a bundled scene, original vs RCPP + DRCD
(`rcpp_hf.shapesworld.demo`)."""

from __future__ import annotations

import argparse

from transformers import AutoProcessor

from rcpp_hf.cli.options import check_at_least, model_folder
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld import demo
from rcpp_hf.shapesworld.captions import reference_caption
from rcpp_hf.shapesworld.render import render_scene


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="original vs RCPP + DRCD caption on a bundled ShapesWorld scene",
                                 description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default=None, help="checkpoint folder or shapesworld-smol (default: the embedded ShapesWorld model)")
    parser.add_argument("--config", default=demo.DEMO_PRESET, help="generation (RCPP) preset: a shipped name or "
                        f"a YAML path (default: {demo.DEMO_PRESET}, which evicts from the first step; rcpp_default "
                        "holds every token until step 32)")
    parser.add_argument("--output", default="rcpp_demo.png", help="where the patch-map PNG goes")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    model_path = model_folder(args.model)
    overrides = {"rcpp": True, "max_new_tokens": args.max_new_tokens, "do_sample": False, "return_dict_in_generate": True}
    config = build_generation_config(args.config, **overrides)
    model = RCPPLlavaForConditionalGeneration.from_pretrained(model_path).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    scene = demo.demo_scene()
    image = render_scene(scene)
    original, rcpp, trace = demo.caption_both_ways(model, processor, image, config)

    print(f"model: {model_path}\nscene: {scene.name} (test world)")
    print(f"true objects:   {reference_caption(scene)}\n    kinds: {', '.join(sorted(scene.kinds))}")
    print(f"original LLaVA: {demo.with_absent_kinds(original, scene)}")
    print(f"RCPP + DRCD:    {demo.with_absent_kinds(rcpp, scene)}")
    print(f"    settings ({args.config}): {demo.settings_line(config)}")
    last = trace.steps[-1]
    kept = int((~last.scores[0].isnan()).sum())
    print(f"    visual tokens kept at the last step: {kept}/{trace.num_visual_tokens}, "
          f"visual KV {last.visual_cache_bytes / 1024:.1f} KiB")  # fmt: skip
    title = f"RCPP + DRCD, {args.config}: {demo.settings_line(config)}"
    figure = demo.patch_state_figure(image, trace, config.tau, demo.demo_steps(trace), config.tau_mode, title)
    figure.savefig(args.output, dpi=110)
    print(f"patch map: {args.output}")
    if config.schedule == "step" and len(trace.steps) <= config.schedule_steps:
        print(f"note: schedule 'step' keeps every visual token in the cache, and lambda at {config.lambda_start:g}, "
              f"until step {config.schedule_steps}; this caption ended at step {len(trace.steps)}, so nothing was "
              "evicted (the core set C still decided each token)")  # fmt: skip
    return 0
