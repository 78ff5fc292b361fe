"""Tiny LLaVA-NeXT (1.6) and LLaVA-OneVision checkpoints built in code, for tests: the families' real layouts at a
few dozen visual tokens.

- LLaVA-NeXT: a CLIP tower, the two-layer projector and a Llama decoder (GQA). `image_grid_pinpoints` give a base
  tile plus a grid of up to 2 x 2 tiles, so an image becomes its base tile's 16 tokens (CLS dropped), then the
  unpadded grid's tokens with one `image_newline` token after each row: 36 to 88 visual tokens depending on the
  image's size and aspect ratio.
- LLaVA-OneVision: a SigLIP tower (no CLS token), the projector and a Qwen2 decoder (bias in q / k / v, GQA); the
  same tile layout, with OneVision's `anyres_max_9` shrinking of large grids (which a tiny grid never triggers).
  Its processor is built without the video processor, which needs torchvision (`OnevisionProcessorWithoutVideo`).

Both are saved with their processor's parts (the byte-level tokenizer of `tiny.py` and the Pillow image processor),
so that `from_pretrained(folder)` takes a real checkpoint's path; `load_tiny_processor` reads them back. The weights
are random: for exercising code only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from rcpp_hf.tiny import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, build_tokenizer


@dataclass(frozen=True)
class TinyAnyresSpec:
    """Shapes of a tiny anyres model: tiles of `tile_size` pixels cut into `patch_size` patches ((16 / 4)^2 = 16
    tokens per tile), a grid of at most `max_grid` x `max_grid` tiles (or the grids of `pinpoints`, [height, width]
    in pixels), and a small GQA decoder. Intermediate sizes default to twice the hidden size; `model_vocab_size`, if
    larger than the tokenizer's, pads the embedding and LM head to a real checkpoint's vocabulary (benchmark
    shapes, `benchmark/model_sizes.py`)."""

    tile_size: int = 16
    patch_size: int = 4
    max_grid: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 320
    vision_feature_layer: int = -2
    seed: int = 0
    vision_intermediate: int | None = None
    text_intermediate: int | None = None
    model_vocab_size: int | None = None
    max_positions: int = 2048
    pinpoints: tuple[tuple[int, int], ...] | None = None

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """`pinpoints`, else every grid of 1..max_grid tiles a side, as [height, width] in pixels."""
        if self.pinpoints is not None:
            return [list(pinpoint) for pinpoint in self.pinpoints]
        sides = range(1, self.max_grid + 1)
        return [[rows * self.tile_size, cols * self.tile_size] for rows in sides for cols in sides]


class WithoutVideoProcessor:
    """A processor mixin for images only: the video processor is None. transformers checks every part's class when
    a processor is built, and the video processor's base class is not importable without torchvision; this mixin
    skips that one check. Prompts are the stock processor's, token for token."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class OnevisionProcessorWithoutVideo(WithoutVideoProcessor, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` for images only (`WithoutVideoProcessor`)."""


def _text_kwargs(spec: TinyAnyresSpec, tokenizer) -> dict:
    return dict(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=max(len(tokenizer), spec.model_vocab_size or 0),
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_kwargs(spec: TinyAnyresSpec) -> dict:
    return dict(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.tile_size,
        patch_size=spec.patch_size,
    )


def _finish(model, tokenizer):
    model = model.eval()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model


def build_tiny_llava_next(spec: TinyAnyresSpec = TinyAnyresSpec(),
                          model_class: type[LlavaNextForConditionalGeneration] = LlavaNextForConditionalGeneration):
    """A randomly initialised tiny LLaVA-NeXT (float32, eval mode) and its `LlavaNextProcessor`; `model_class` may be
    a subclass (e.g. rcpp_hf's), built directly so that a large shape is never held twice."""
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(spec), projection_dim=spec.vision_hidden),
        text_config=LlamaConfig(**_text_kwargs(spec, tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=spec.grid_pinpoints,
        vision_feature_select_strategy="default",  # drops CLIP's CLS, as llava-hf's NeXT checkpoints do
        vision_feature_layer=spec.vision_feature_layer,
        image_seq_length=spec.tokens_per_tile,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = _finish(model_class(config), tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.tile_size},
        crop_size={"height": spec.tile_size, "width": spec.tile_size},
        image_grid_pinpoints=spec.grid_pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def build_tiny_llava_onevision(spec: TinyAnyresSpec = TinyAnyresSpec()):
    """A randomly initialised tiny LLaVA-OneVision (float32, eval mode) and its `LlavaOnevisionProcessor`, built
    without a video processor."""
    tokenizer = build_tokenizer(spec.vocab_size)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs(spec)),
        text_config=Qwen2Config(**_text_kwargs(spec, tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=spec.grid_pinpoints,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token: every patch is a feature
        vision_feature_layer=spec.vision_feature_layer,
        vision_aspect_ratio="anyres_max_9",
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(spec.seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": spec.tile_size, "width": spec.tile_size},
        image_grid_pinpoints=spec.grid_pinpoints,
    )
    return model, onevision_processor(image_processor, tokenizer, model.config)


def onevision_processor(image_processor, tokenizer, config) -> OnevisionProcessorWithoutVideo:
    """The OneVision processor of `image_processor` and `tokenizer` for a model of `config` (no video processor)."""
    tokens_per_tile = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return OnevisionProcessorWithoutVideo(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,  # OneVision's video processor needs torchvision
        num_image_tokens=tokens_per_tile,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


BUILDERS = {"llava_next": build_tiny_llava_next, "llava_onevision": build_tiny_llava_onevision}


def save_tiny_family(folder: str | Path, model_type: str, spec: TinyAnyresSpec = TinyAnyresSpec()) -> Path:
    """Build the tiny model of `model_type` ("llava_next" or "llava_onevision") and save it with its processor into
    `folder`; returns the folder."""
    if model_type not in BUILDERS:
        raise ValueError(f"no tiny builder for model_type {model_type!r}; choose one of {sorted(BUILDERS)}")
    folder = Path(folder)
    model, processor = BUILDERS[model_type](spec)
    model.save_pretrained(folder)
    if model_type == "llava_onevision":  # saved part by part: a processor without its video part does not save
        processor.tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
    else:
        processor.save_pretrained(folder)
    return folder


def load_tiny_processor(folder: str | Path, config):
    """The processor of a folder `save_tiny_family` wrote, for a model of `config`."""
    if config.model_type == "llava_onevision":
        return onevision_processor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                   config)  # fmt: skip
    return AutoProcessor.from_pretrained(folder)
