"""`rcpp-hf generate`: caption an image with RCPP + DRCD, optionally beside the original LLaVA output."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rcpp_hf.engine.cache import cache_nbytes
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.default_model import default_model_path
from rcpp_hf.eval.runner import load_model

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "rcpp_default.yaml"
LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="caption an image with RCPP + DRCD (and, with --compare, vanilla)")
    parser.add_argument("--model", help="checkpoint folder or hub id (default: the embedded default model)")
    parser.add_argument("--image", type=Path, help="image file (default: a drawn test scene)")
    parser.add_argument("--prompt", default="Describe the image.", help="question; wrapped in the LLaVA-1.5 template "
                        "unless it already contains <image>")
    parser.add_argument("--config", type=Path, help="RCPP YAML preset (default: RCPPGenerationConfig defaults)")
    parser.add_argument("--max-new-tokens", type=int, help="overrides the preset")
    parser.add_argument("--compare", action="store_true", help="also run vanilla LLaVA decoding and compare")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(func=run)


def drawn_scene() -> Image.Image:
    """A deterministic stand-in image: a red circle and a blue square on grey."""
    image = Image.new("RGB", (336, 336), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 150, 170), fill=(220, 30, 30))
    draw.rectangle((190, 170, 300, 280), fill=(30, 60, 220))
    return image


def load_generation_config(path: Path | None, max_new_tokens: int | None) -> RCPPGenerationConfig:
    overrides = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if path is None:
        return RCPPGenerationConfig(**{"max_new_tokens": 64, "do_sample": False, **overrides})
    return RCPPGenerationConfig.from_yaml(path, **overrides)


def timed_generate(model, inputs, generation_config) -> tuple[object, float]:
    start = time.perf_counter()
    out = model.generate(**inputs, generation_config=generation_config)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    if args.image is not None and not args.image.is_file():
        raise SystemExit(f"rcpp-hf generate: image file not found: {args.image}")
    generation_config = load_generation_config(args.config, args.max_new_tokens)
    generation_config.return_dict_in_generate = True
    model_path = args.model or str(default_model_path())
    model, processor = load_model(model_path, args.dtype, args.device)
    image = Image.open(args.image).convert("RGB") if args.image else drawn_scene()
    text = args.prompt if "<image>" in args.prompt else LLAVA_TEMPLATE.format(prompt=args.prompt)
    inputs = processor(images=image, text=text, return_tensors="pt").to(args.device, dtype=model.dtype)
    prompt_length = inputs["input_ids"].shape[1]

    model.generate(**inputs, max_new_tokens=2)  # warm-up, so that neither timed run pays for first-call setup
    runs = []
    if args.compare:
        vanilla_config = copy.deepcopy(generation_config)
        vanilla_config.rcpp = False  # the model's own _sample: exactly LlavaForConditionalGeneration.generate
        runs.append(("original LLaVA", *timed_generate(model, inputs, vanilla_config)))
    runs.append(("RCPP + DRCD", *timed_generate(model, inputs, generation_config)))

    print(f"model: {model_path}   prompt: {text!r}")
    for name, out, seconds in runs:
        new_tokens = out.sequences.shape[1] - prompt_length
        caption = processor.decode(out.sequences[0, prompt_length:], skip_special_tokens=True).strip()
        cache = out.past_key_values
        if getattr(out, "rcpp", None) is not None:
            kept = f"{cache.num_visual_tokens}/{out.rcpp.num_visual_tokens}"
            visual_bytes = cache.visual_nbytes()
        else:
            kept, visual_bytes = "all", None
        print(f"\n== {name}\n{caption}")
        print(f"   new tokens {new_tokens}, time {seconds:.2f} s ({1000 * seconds / max(new_tokens, 1):.1f} ms/token), "
              f"visual tokens kept {kept}, cache {cache_nbytes(cache) / 1024:.1f} KiB"
              + ("" if visual_bytes is None else f" (visual {visual_bytes / 1024:.1f} KiB)"))
    return 0

