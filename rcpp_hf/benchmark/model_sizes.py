"""Model shapes the benchmark builds with random weights (no download), or a real checkpoint by path / hub id."""

from __future__ import annotations

import torch

from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.tiny import TinyLlavaSpec, build_tiny_llava

LLAVA_VOCAB = 32064

SHAPES: dict[str, TinyLlavaSpec] = {
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
}


def load_benchmark_model(shape: str | None, model: str | None, device: str, dtype: torch.dtype):
    """(RCPP model, processor) for a named shape with random weights, or for a checkpoint path / hub id."""
    if model is not None:
        from transformers import AutoProcessor

        loaded = RCPPLlavaForConditionalGeneration.from_pretrained(model, dtype=dtype)
        return loaded.to(device).eval(), AutoProcessor.from_pretrained(model)
    if shape not in SHAPES:
        raise ValueError(f"unknown benchmark shape {shape!r}; expected one of {sorted(SHAPES)} or --model")
    if shape == "7b" and not str(device).startswith("cuda"):
        raise ValueError("the '7b' shape needs a CUDA device (about 14 GB in float16); use --shape small on CPU")
    with torch.device(device):  # initialised where it runs: a 7B model's random init is minutes on a CPU
        model, processor = build_tiny_llava(SHAPES[shape], model_class=RCPPLlavaForConditionalGeneration)
    return model.to(device=device, dtype=dtype).eval(), processor
