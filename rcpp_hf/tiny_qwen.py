"""Tiny Qwen2.5-VL and Qwen2-VL checkpoints built in code, for tests: the families' real layouts (dynamic
resolution, the 2 x 2 patch merger, M-RoPE positions) at a few dozen visual tokens.

An image of H x W pixels is resized to multiples of `patch_size * merge_size` (8) pixels, cut into 4 x 4 patches and
merged 2 x 2: (24, 40) pixels give a 6 x 10 patch grid and 15 visual tokens, (32, 40) give 20. Qwen2.5-VL's tower
attends within windows of `window_size` pixels (2 x 2 merged tokens) except in `fullatt_block_indexes`; Qwen2-VL's
attends to the whole image in every block. Both decoders are Qwen2 (bias in q / k / v, grouped-query attention).

The tokenizer is `tiny.py`'s byte-level BPE with Qwen's vision markers added (`<|vision_start|>`, `<|vision_end|>`,
`<|video_pad|>`); `<image>` stands for Qwen's `<|image_pad|>`. The processors are built without their video
processor, which needs torchvision. The weights are random: for exercising code only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from rcpp_hf.tiny import IMAGE_TOKEN, build_tokenizer
from rcpp_hf.tiny_families import WithoutVideoProcessor

VISION_START, VISION_END, VIDEO_TOKEN = "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"
# A prompt's image, as Qwen's chat template writes it (with `<image>` for `<|image_pad|>`).
QWEN_IMAGE = f"{VISION_START}{IMAGE_TOKEN}{VISION_END}"
# Qwen-VL's chat layout, images before the text of each message (the released template also numbers images and
# renders videos and a default system turn; those are left out).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '" + QWEN_IMAGE + "' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Shapes of a tiny Qwen-VL: 4-pixel patches merged 2 x 2, images of `min_pixels` to `max_pixels` pixels, a
    vision tower of `vision_layers` blocks and a small GQA decoder."""

    patch_size: int = 4
    merge_size: int = 2
    min_pixels: int = 8 * 8
    max_pixels: int = 48 * 48
    window_size: int = 16  # Qwen2.5-VL: windows of 2 x 2 merged tokens
    fullatt_block_indexes: tuple[int, ...] = (1,)
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int | None = None  # default: twice vision_hidden
    text_hidden: int = 64
    text_layers: int = 4
    text_intermediate: int | None = None  # default: twice text_hidden
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 320
    model_vocab_size: int | None = None  # the embedding's rows, when larger than the tokenizer (a real vocabulary)
    max_positions: int = 2048
    rope_theta: float = 10000.0
    seed: int = 0

    @property
    def max_visual_tokens(self) -> int:
        """The most visual tokens an image gets: `max_pixels` over a merged token's pixels."""
        return self.max_pixels // (self.patch_size * self.merge_size) ** 2

    @property
    def mrope_section(self) -> list[int]:
        """M-RoPE's split of a head's rotary half into t / h / w frequencies (Qwen's 16 / 24 / 24 of 64, scaled)."""
        half = self.text_hidden // self.num_heads // 2
        return [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]


class Qwen2_5_VLProcessorWithoutVideo(WithoutVideoProcessor, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` for images only (no video processor, which needs torchvision)."""


class Qwen2VLProcessorWithoutVideo(WithoutVideoProcessor, Qwen2VLProcessor):
    """`Qwen2VLProcessor` for images only (no video processor, which needs torchvision)."""


def build_qwen_tokenizer(vocab_size: int):
    """`tiny.py`'s tokenizer with Qwen's vision markers as special tokens and Qwen's chat layout."""
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_tokens([VISION_START, VISION_END, VIDEO_TOKEN], special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _config(model_type: str, spec: TinyQwenSpec, tokenizer):
    text = dict(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=max(len(tokenizer), spec.model_vocab_size or 0),
        max_position_embeddings=spec.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta, "mrope_section": spec.mrope_section},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden if model_type == "qwen2_5_vl" else spec.text_hidden,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size,
        temporal_patch_size=2,
    )
    if model_type == "qwen2_5_vl":
        vision.update(intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
                      out_hidden_size=spec.text_hidden,
                      window_size=spec.window_size, fullatt_block_indexes=list(spec.fullatt_block_indexes))  # fmt: skip
        config_class = Qwen2_5_VLConfig
    else:
        vision.update(embed_dim=spec.vision_hidden, mlp_ratio=2)  # Qwen2-VL's merger projects to hidden_size
        config_class = Qwen2VLConfig
    ids = tokenizer.convert_tokens_to_ids
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids(IMAGE_TOKEN),
        video_token_id=ids(VIDEO_TOKEN),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
    )


MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
PROCESSOR_CLASSES = {"qwen2_5_vl": Qwen2_5_VLProcessorWithoutVideo, "qwen2_vl": Qwen2VLProcessorWithoutVideo}


def image_processor(spec: TinyQwenSpec) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=spec.patch_size, temporal_patch_size=2, merge_size=spec.merge_size,
                                    min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)  # fmt: skip


def build_tiny_qwen(model_type: str, spec: TinyQwenSpec = TinyQwenSpec(), model_class=None):
    """A randomly initialised tiny Qwen2.5-VL ("qwen2_5_vl") or Qwen2-VL ("qwen2_vl") (float32, eval mode; the stock
    class, or `model_class`) and its processor, built without a video processor."""
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"no tiny Qwen builder for model_type {model_type!r}; choose one of {sorted(MODEL_CLASSES)}")
    tokenizer = build_qwen_tokenizer(spec.vocab_size)
    torch.manual_seed(spec.seed)
    model = (model_class or MODEL_CLASSES[model_type])(_config(model_type, spec, tokenizer)).eval()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    processor = PROCESSOR_CLASSES[model_type](image_processor=image_processor(spec), tokenizer=tokenizer,
                                              video_processor=None, chat_template=QWEN_CHAT_TEMPLATE)  # fmt: skip
    return model, processor


def save_tiny_qwen(folder: str | Path, model_type: str, spec: TinyQwenSpec = TinyQwenSpec()) -> Path:
    """Build the tiny model of `model_type` and save it with its processor's parts into `folder` (a processor
    without its video part does not save as a whole); returns the folder."""
    folder = Path(folder)
    model, processor = build_tiny_qwen(model_type, spec)
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return folder


def load_tiny_qwen_processor(folder: str | Path, model_type: str):
    """The processor of a folder `save_tiny_qwen` wrote."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return PROCESSOR_CLASSES[model_type](image_processor=AutoImageProcessor.from_pretrained(folder),
                                         tokenizer=tokenizer, video_processor=None,
                                         chat_template=tokenizer.chat_template)  # fmt: skip
