"""`rcpp-hf generate`: caption an image with RCPP + DRCD or a registry method, optionally beside the original LLaVA
output."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from rcpp_hf.auto import model_shape
from rcpp_hf.cli.errors import UsageError, one_line
from rcpp_hf.cli.options import (
    add_method_arguments,
    check_at_least,
    check_device,
    model_folder,
)
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.cache import VisualKVCache, cache_nbytes
from rcpp_hf.eval.answerer import load_model
from rcpp_hf.run_config import build_generation_config, load_method_preset

LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="caption an image with RCPP + DRCD (and, with --compare, vanilla)")
    parser.add_argument("--model", help="checkpoint folder or hub id or shapesworld-smol (default: the embedded default model)")
    parser.add_argument("--image", type=Path, help="image file (default: a drawn test scene)")
    parser.add_argument("--prompt", default="Describe the image.", help="question; wrapped in the LLaVA-1.5 template "
                        "unless it already contains <image>")
    parser.add_argument("--config", help="generation (RCPP) preset: a shipped name (rcpp_evict, ...) or a YAML path "
                        "(default: RCPPGenerationConfig defaults; with --method: the method alone, rcpp off)")
    add_method_arguments(parser)
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


def read_image(path: Path) -> Image.Image:
    """The --image file as RGB, read before the model loads so that a wrong file fails at once."""
    if not path.is_file():
        raise UsageError(f"image file not found: {path}; pass --image an existing image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise UsageError(f"--image {path}: not an image file PIL can read; pass a PNG, JPEG, ... file") from None
    except (OSError, SyntaxError, ValueError) as error:  # a damaged image (e.g. truncated): PIL raises any of these
        raise UsageError(f"--image {path}: a damaged image PIL cannot read ({one_line(error)}); pass a PNG, JPEG, ... "
                         "file") from None  # fmt: skip


def setting_label(config: RCPPGenerationConfig) -> str:
    """E.g. "RCPP + DRCD", "RCPP + DRCD (first-token action)", "fastv(budget=64)", "RCPP + DRCD + fastv(budget=64)"."""
    rcpp = "RCPP + DRCD" + (" (first-token action)" if config.first_token_action else "")
    parts = ([rcpp] if config.rcpp else []) + [method.describe() for method in config.methods]
    return " + ".join(parts) or "original LLaVA"


def timed_generate(model, inputs, generation_config) -> tuple[object, float]:
    start = time.perf_counter()
    out = model.generate(**inputs, generation_config=generation_config)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    # Every check runs before the model loads: a mistake costs no loading time.
    check_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    check_device(args.device)
    image = read_image(args.image) if args.image else drawn_scene()
    method = load_method_preset(args.method, args.method_config)
    overrides = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    if args.config is None:  # RCPP's defaults, or the method alone with RCPP off; greedy, 64 new tokens
        overrides = {"rcpp": method is None, "max_new_tokens": 64, **overrides}
    generation_config = build_generation_config(args.config, method, **overrides)
    generation_config.return_dict_in_generate = True
    model_path = model_folder(args.model)
    shape = model_shape(model_path)  # e.g. a budget this model cannot reach
    for registered in generation_config.methods:
        registered.check_fits(*shape)
    model, processor = load_model(model_path, args.dtype, args.device)
    text = args.prompt if "<image>" in args.prompt else LLAVA_TEMPLATE.format(prompt=args.prompt)
    inputs = processor(images=image, text=text, return_tensors="pt").to(args.device, dtype=model.dtype)
    prompt_length = inputs["input_ids"].shape[1]

    model.generate(**inputs, max_new_tokens=2)  # warm-up, so that neither timed run pays for first-call setup
    runs = []
    if args.compare:
        vanilla_config = copy.deepcopy(generation_config)
        vanilla_config.rcpp, vanilla_config.methods = False, ()  # exactly LlavaForConditionalGeneration.generate
        runs.append(("original LLaVA", *timed_generate(model, inputs, vanilla_config)))
    runs.append((setting_label(generation_config), *timed_generate(model, inputs, generation_config)))
    num_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())

    print(f"model: {model_path}   prompt: {text!r}")
    for name, out, seconds in runs:
        new_tokens = out.sequences.shape[1] - prompt_length
        caption = processor.decode(out.sequences[0, prompt_length:], skip_special_tokens=True).strip()
        cache = out.past_key_values
        if isinstance(cache, VisualKVCache):  # the methods' cache; the deepest layer holds the fewest visual tokens
            kept = f"{cache.num_visual_tokens}/{num_visual}"
            visual_bytes = cache.visual_nbytes()
        else:
            kept, visual_bytes = "all", None
        contrast = getattr(out, "contrast_past_key_values", None)  # a contrastive decoder's second cache
        print(f"\n== {name}\n{caption}")
        for record in getattr(out, "pruning", None) or []:
            print(f"   prefill pruning before layer {record.layer}: {record.kept}/{num_visual} visual tokens kept")
        print(f"   new tokens {new_tokens}, time {seconds:.2f} s ({1000 * seconds / max(new_tokens, 1):.1f} ms/token), "
              f"visual tokens kept {kept}, cache {cache_nbytes(cache) / 1024:.1f} KiB"
              + ("" if visual_bytes is None else f" (visual {visual_bytes / 1024:.1f} KiB)")
              + ("" if contrast is None else f", contrast branch's cache {cache_nbytes(contrast) / 1024:.1f} KiB"))
    return 0

