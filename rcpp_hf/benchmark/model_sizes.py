"""Model shapes the benchmark builds with random weights (no download), or a real checkpoint by path / hub id."""

from __future__ import annotations

import torch

from rcpp_hf.auto import from_pretrained
from rcpp_hf.modeling import (
    RCPPLlavaForConditionalGeneration,
    RCPPLlavaNextForConditionalGeneration,
    RCPPQwen2_5_VLForConditionalGeneration,
)
from rcpp_hf.tiny import TinyLlavaSpec, build_tiny_llava
from rcpp_hf.tiny_families import TinyAnyresSpec, build_tiny_llava_next
from rcpp_hf.tiny_qwen import TinyQwenSpec, build_tiny_qwen

LLAVA_VOCAB = 32064
# llava-hf/llava-v1.6-*'s grids ([height, width] in pixels): a 672 x 672 image is the base tile and a 2 x 2 grid,
# 576 + 48 x 48 + 48 newlines = 2,928 visual tokens
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
QWEN_VOCAB = 152064
# Qwen2.5-VL's processor: 14-pixel patches merged 2 x 2, from 56 x 56 up to 12,845,056 pixels (its defaults)
QWEN_PIXELS = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=12845056)

SHAPES: dict[str, TinyLlavaSpec | TinyAnyresSpec | TinyQwenSpec] = {
    # the tests' model: 16 visual tokens
    "tiny": TinyLlavaSpec(),
    # CPU-representative: LLaVA-1.5's layout scaled down (MHA, 576 visual tokens, LLaVA's vocabulary); the vision
    # tower is kept small because it runs once per image and is not what RCPP changes
    "small": TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=256, vision_layers=2, vision_heads=4,
        text_hidden=1024, text_layers=8, text_intermediate=2752, num_heads=16, num_kv_heads=16,
        model_vocab_size=LLAVA_VOCAB,
    ),
    # LLaVA-1.5-7B's widths on a CPU: CLIP ViT-L/14-336 and Vicuna-7B's layers (4096 wide, 32 heads, MLP 11008) and
    # vocabulary, 8 of its 32 decoder layers (as `small`, so the pruners' stages fall alike); about 8 GB in float32
    "7b-width": TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=8, text_intermediate=11008, num_heads=32,
        num_kv_heads=32, model_vocab_size=LLAVA_VOCAB,
    ),
    # exactly llava-1.5-7b (CLIP ViT-L/14-336 + Vicuna-7B); float16, GPU only
    "7b": TinyLlavaSpec(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_intermediate=11008, num_heads=32,
        num_kv_heads=32, model_vocab_size=LLAVA_VOCAB,
    ),
    # the tests' LLaVA-NeXT: tiles of 16 / 4, grids up to 2 x 2; a 32 x 32 image gives 16 + 8 x 8 + 8 = 88 visual tokens
    "next-tiny": TinyAnyresSpec(),
    # CPU-sized LLaVA-NeXT: llava-v1.6's anyres layout and token count (CLIP tiles of 336 / 14, its pinpoints) with
    # small widths (a 512-wide, 8-layer MHA decoder, a 2-layer vision tower, run on five tiles) and LLaVA's vocabulary
    "next-small": TinyAnyresSpec(
        tile_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS, vision_hidden=256, vision_layers=2,
        vision_heads=4, text_hidden=512, text_layers=8, text_intermediate=1376, num_heads=8, num_kv_heads=8,
        model_vocab_size=LLAVA_VOCAB, max_positions=4096,
    ),
    # exactly llava-v1.6-vicuna-7b (CLIP ViT-L/14-336 + Vicuna-7B, anyres); float16, GPU only
    "next-7b": TinyAnyresSpec(
        tile_size=336, patch_size=14, pinpoints=LLAVA_NEXT_PINPOINTS, vision_hidden=1024, vision_layers=24,
        vision_heads=16, vision_intermediate=4096, text_hidden=4096, text_layers=32, text_intermediate=11008,
        num_heads=32, num_kv_heads=32, model_vocab_size=LLAVA_VOCAB, max_positions=4096,
    ),
    # the tests' Qwen2.5-VL: patches of 4 merged 2 x 2, at most 48 x 48 pixels = 36 visual tokens
    "qwen-tiny": TinyQwenSpec(),
    # CPU-sized Qwen2.5-VL: its processor, so the benchmark's 672 x 672 image is 24 x 24 = 576 merged tokens, with
    # small widths (a 512-wide, 8-layer GQA decoder, a 4-block windowed tower) and Qwen's vocabulary
    "qwen-small": TinyQwenSpec(
        **QWEN_PIXELS, window_size=112, fullatt_block_indexes=(3,), vision_hidden=256, vision_layers=4,
        vision_heads=4, text_hidden=512, text_layers=8, text_intermediate=1376, num_heads=8, num_kv_heads=2,
        model_vocab_size=QWEN_VOCAB, max_positions=32768, rope_theta=1e6,
    ),
    # exactly Qwen2.5-VL-7B-Instruct's config (its windowed ViT + Qwen2-7B's decoder); bfloat16 / float16, GPU only
    "qwen-7b": TinyQwenSpec(
        **QWEN_PIXELS, window_size=112, fullatt_block_indexes=(7, 15, 23, 31), vision_hidden=1280, vision_layers=32,
        vision_heads=16, vision_intermediate=3420, text_hidden=3584, text_layers=28, text_intermediate=18944,
        num_heads=28, num_kv_heads=4, model_vocab_size=QWEN_VOCAB, max_positions=128000, rope_theta=1e6,
    ),
}
GPU_ONLY = ("7b", "next-7b", "qwen-7b")


def load_benchmark_model(shape: str | None, model: str | None, device: str, dtype: torch.dtype):
    """(RCPP model, processor) for a named shape with random weights, or for a checkpoint path / hub id (its
    family's rcpp_hf class)."""
    if model is not None:
        from transformers import AutoProcessor

        loaded = from_pretrained(model, dtype=dtype)
        return loaded.to(device).eval(), AutoProcessor.from_pretrained(model)
    if shape not in SHAPES:
        raise ValueError(f"unknown benchmark shape {shape!r}; expected one of {sorted(SHAPES)} or --model")
    if shape in GPU_ONLY and not str(device).startswith("cuda"):
        small = shape.replace("-7b", "-small") if "-" in shape else "small"
        raise ValueError(f"the {shape!r} shape needs a CUDA device (about 14 GB in float16); use --shape {small} "
                         "on CPU")
    spec = SHAPES[shape]
    with torch.device(device):  # initialised where it runs: a 7B model's random init is minutes on a CPU
        if isinstance(spec, TinyQwenSpec):
            model, processor = build_tiny_qwen("qwen2_5_vl", spec, model_class=RCPPQwen2_5_VLForConditionalGeneration)
        elif isinstance(spec, TinyAnyresSpec):
            model, processor = build_tiny_llava_next(spec, model_class=RCPPLlavaNextForConditionalGeneration)
        else:
            model, processor = build_tiny_llava(spec, model_class=RCPPLlavaForConditionalGeneration)
    return model.to(device=device, dtype=dtype).eval(), processor
