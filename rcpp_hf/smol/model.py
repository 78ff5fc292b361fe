"""The SmolLM2 ShapesWorld LLaVA before its delta: SmolLM2's decoder, ShapesWorld's vision tower, a fresh projector.

LLaVA-1.5's layout (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"): the embedded ShapesWorld
model's CLIP tower (160 px images, 100 visual tokens, CLS dropped; stored in float32, bit for bit the tower the delta
was trained with) with its image processor, a two-layer GELU
projector from its width (192) to the language model's (576), and SmolLM2-135M-Instruct dequantised from its
GGUF file (30 layers, 9 query heads sharing 3 KV heads, tied input / output embeddings). The tokenizer is
SmolLM2's with `<image>` appended as a special token (id 49152); its embedding row starts as the mean of the
others and is trained (it is also the token's output row, tied). Prompts use llava-1.5's chat template.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from rcpp_hf.default_model import SHAPESWORLD_CHECKPOINT
from rcpp_hf.tiny import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE


def llava_tokenizer(gguf_path: Path) -> PreTrainedTokenizerFast:
    """The GGUF file's tokenizer with `<image>` added as a special token, left padding for batched generation."""
    source = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(source.backend_tokenizer),
        bos_token=source.bos_token,
        eos_token=source.eos_token,
        pad_token=source.pad_token or source.eos_token,
        unk_token=source.unk_token,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )


def _text_config(language_model, vocab_size: int) -> LlamaConfig:
    """The decoder's config as a plain LlamaConfig (no GGUF quantisation marker, which would refuse saving)."""
    values = language_model.config.to_dict()
    for key in ("quantization_config", "architectures", "_name_or_path", "transformers_version", "dtype"):
        values.pop(key, None)
    return LlamaConfig(**{**values, "vocab_size": vocab_size})


def assemble_smol_llava(
    gguf_path: str | Path, vision_checkpoint: str | Path = SHAPESWORLD_CHECKPOINT, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The LLaVA model (float32, eval mode) and processor; the projector is initialised from `seed`."""
    gguf_path = Path(gguf_path)
    tokenizer = llava_tokenizer(gguf_path)
    language_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    vision = LlavaForConditionalGeneration.from_pretrained(vision_checkpoint, dtype=torch.float32)
    image_processor = LlavaProcessor.from_pretrained(vision_checkpoint).image_processor

    text_config = _text_config(language_model, len(tokenizer))
    if not text_config.tie_word_embeddings:
        raise ValueError("expected a language model with tied input / output embeddings (SmolLM2's layout)")
    config = LlavaConfig(
        vision_config=vision.config.vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=vision.config.image_seq_length,
        vision_feature_select_strategy=vision.config.vision_feature_select_strategy,
        vision_feature_layer=vision.config.vision_feature_layer,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(vision.model.vision_tower.state_dict())
    decoder = language_model.model.state_dict()
    embeddings = decoder.pop("embed_tokens.weight")  # (vocab, hidden)
    decoder["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(decoder)
    model.tie_weights()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.vision_config.patch_size,
        vision_feature_select_strategy=vision.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor
