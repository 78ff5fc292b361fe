"""The ShapesWorld LLaVA: tiny.py's LLaVA-1.5 layout at the size the shipped checkpoint is trained at.

CLIP vision tower (160 px images, 16 px patches: 100 visual tokens + CLS, dropped), LLaVA-1.5's
two-layer GELU projector, a Llama decoder with grouped-query attention (8 query heads, 2 kv
heads), and the ShapesWorld tokenizer with llava-1.5's chat template. The vision features come from
the tower's last layer (`vision_feature_layer=-1`), so that every layer trained is a layer used.
"""

from __future__ import annotations

from dataclasses import replace

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from rcpp_hf.shapesworld.tokenizer import build_shapesworld_tokenizer
from rcpp_hf.shapesworld.world import WorldConfig
from rcpp_hf.tiny import TinyLlavaSpec, build_tiny_llava

SHAPESWORLD_SPEC = TinyLlavaSpec(
    image_size=WorldConfig().image_size,
    patch_size=16,
    vision_hidden=192,
    vision_layers=4,
    text_hidden=256,
    text_layers=4,
    num_heads=8,
    num_kv_heads=2,
    vision_feature_layer=-1,
)


def build_shapesworld_llava(
    spec: TinyLlavaSpec = SHAPESWORLD_SPEC, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised (seeded) ShapesWorld LLaVA and its processor, ready to train."""
    return build_tiny_llava(replace(spec, seed=seed), tokenizer=build_shapesworld_tokenizer())
