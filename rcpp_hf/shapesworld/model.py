"""The ShapesWorld LLaVA: tiny.py's LLaVA-1.5 layout at the size of ShapesWorld v2's deeper model.

CLIP vision tower (160 px images, 16 px patches: 100 visual tokens + CLS, dropped; 4 layers, hidden
192), LLaVA-1.5's two-layer GELU projector, a 12-layer Llama decoder (hidden 256, intermediate 512)
with grouped-query attention (8 query heads of 32 dimensions, 2 kv heads), and the ShapesWorld
tokenizer with llava-1.5's chat template. The vision features come from the tower's last layer
(`vision_feature_layer=-1`), so that every layer trained is a layer used.

Why 12 layers of 256: the methods compared act at a depth (FastV at layer 2, PDrop at 1/4, 1/2 and
3/4 of the depth, RCPP on the last 4 layers...), which needs a decoder of at least 12 layers for their
defaults to land on distinct layers. The width is the first model's (4 layers of 256), because the
12-layer model is that model deepened by block expansion (`expand.py`) and then trained on every
question type: a 12 x 160 decoder trained from scratch for 1500 steps (75 min) stayed far from the
targets (POPE random 0.80, colour and position at chance), while the expanded model starts where the
first one ended. The shipped checkpoint (`rcpp_hf/shapesworld/checkpoint/`) is that 12 x 256 model; its recipe and
measured competence are in docs/testbeds/shapesworld.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from safetensors.torch import load_file, save_file
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
    text_layers=12,
    num_heads=8,
    num_kv_heads=2,
    vision_feature_layer=-1,
)


def build_shapesworld_llava(
    spec: TinyLlavaSpec = SHAPESWORLD_SPEC, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised (seeded) ShapesWorld LLaVA and its processor, ready to train."""
    return build_tiny_llava(replace(spec, seed=seed), tokenizer=build_shapesworld_tokenizer())


def store_weights_in_float16(folder: str | Path, keep_float32: tuple[str, ...] = ("vision_tower.",)) -> Path:
    """Rewrite `folder/model.safetensors` with float16 tensors, except those whose name starts with one of
    `keep_float32`; returns the file.

    The shipped checkpoint is stored this way to stay within the package's 25 MB budget (the 12-layer model is
    35 MB in float32). Its config keeps `dtype: float32`, so `from_pretrained` loads the float16-rounded weights
    as a float32 model and every computation stays float32; the checkpoint's measured quality is that of the
    stored weights. The vision tower stays float32 by default: it was frozen while the 12-layer decoder trained, so
    it is bit for bit the first model's tower, the one the SmolLM2 testbed's shipped delta was trained on.
    """
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    tensors = load_file(path)
    half = {name: t.half() if t.is_floating_point() and not name.startswith(keep_float32) else t
            for name, t in tensors.items()}  # fmt: skip
    save_file(half, path, metadata={"format": "pt"})
    return path
