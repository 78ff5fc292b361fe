"""A tiny LLaVA-1.5-shaped checkpoint built in code, for tests, benchmarks and offline demos.

No weights can be downloaded here, so everything that needs "a llava-hf checkpoint" builds one:
a CLIP vision tower, the LLaVA-1.5 two-layer GELU projector and a Llama decoder with grouped-query
attention, saved with a LlavaProcessor (a byte-level BPE tokenizer trained locally and a
CLIPImageProcessorPil) so that `from_pretrained(folder)` takes the same path as a real checkpoint.
The weights are random: the model is for exercising code, not for judging quality.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"

# Enough text for the byte-level BPE to learn the prompt template's pieces.
_TOKENIZER_CORPUS = [
    "USER: <image>\nDescribe the image. ASSISTANT: a red circle left of a blue star.",
    "USER: <image>\nIs there a cat in the image? Answer the question using a single word or phrase. ASSISTANT: No",
    "Please describe this image in detail. There is a dog, a person and a small green square.",
    "yes no the a an of in on left right above below and with is there image picture photo",
]

# llava-hf/llava-1.5-*-hf's chat template: "USER: <image>\n{text} ASSISTANT:" for one user turn.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Shapes of the model; defaults give 16 visual tokens and GQA (4 query heads, 2 kv heads).

    `vocab_size` is the locally trained tokenizer's; `model_vocab_size`, if larger, pads the embedding and the
    LM head to a real checkpoint's vocabulary (e.g. LLaVA-1.5's 32064) for realistic benchmark shapes.
    Intermediate sizes default to twice the hidden size.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int | None = None
    text_hidden: int = 64
    text_layers: int = 4
    text_intermediate: int | None = None
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 320
    model_vocab_size: int | None = None
    vision_feature_layer: int = -2  # LLaVA-1.5's choice; -1 uses (and trains) every vision layer
    seed: int = 0

    @property
    def num_visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(vocab_size: int, corpus: Iterable[str] = _TOKENIZER_CORPUS) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (deterministic for a given corpus), `<image>` a special token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",  # decoder-only batching; saved with the tokenizer
    )
    return fast


def build_tiny_llava(
    spec: TinyLlavaSpec = TinyLlavaSpec(),
    tokenizer: PreTrainedTokenizerFast | None = None,
    model_class: type[LlavaForConditionalGeneration] = LlavaForConditionalGeneration,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Return a randomly initialised tiny LLaVA model (float32, eval mode) and its processor.

    `tokenizer` defaults to `build_tokenizer(spec.vocab_size)`; `model_class` may be a subclass (e.g. rcpp_hf's),
    built directly so that a large shape is never held twice.
    """
    tokenizer = tokenizer or build_tokenizer(spec.vocab_size)
    vocab_size = max(len(tokenizer), spec.model_vocab_size or 0)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text_config = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=spec.num_visual_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # The Pillow backend, named as such: transformers' `CLIPImageProcessor` is the torchvision backend, and without
    # torchvision asking for it falls back to this class with a warning. Saved, either is recorded as
    # "CLIPImageProcessor"; AutoProcessor picks the backend when loading.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava(folder: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    """Build the tiny model and save model + processor into `folder`; returns the folder."""
    folder = Path(folder)
    model, processor = build_tiny_llava(spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
