"""The ShapesWorld model and tokenizer: LLaVA-1.5 layout, >= 100 visual tokens, one token per grammar word."""

from dataclasses import replace

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from rcpp_hf.shapesworld.captions import NOUN_TO_KIND
from rcpp_hf.shapesworld.model import (
    SHAPESWORLD_SPEC,
    build_shapesworld_llava,
    store_weights_in_float16,
)
from rcpp_hf.shapesworld.tokenizer import build_shapesworld_tokenizer, tokenizer_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return build_shapesworld_tokenizer()


def test_tokenizer_is_deterministic(tokenizer):
    assert build_shapesworld_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_every_word_of_the_language_is_one_token(tokenizer):
    backend = tokenizer.backend_tokenizer
    lines = [line.replace("<image>", "") for line in tokenizer_corpus()]
    pieces = {piece for line in lines for piece, _ in backend.pre_tokenizer.pre_tokenize_str(line)}
    assert {"Ġ" + noun for noun in NOUN_TO_KIND} <= pieces  # the corpus covers the grammar
    for piece in pieces:
        assert len(backend.model.tokenize(piece)) == 1, piece


def test_spec_has_at_least_100_visual_tokens_and_gqa():
    assert SHAPESWORLD_SPEC.num_visual_tokens >= 100
    assert SHAPESWORLD_SPEC.num_kv_heads < SHAPESWORLD_SPEC.num_heads


def test_processor_is_llava_1_5_shaped():
    model, processor = build_shapesworld_llava()
    assert processor.tokenizer.padding_side == "left"
    assert model.config.image_seq_length == SHAPESWORLD_SPEC.num_visual_tokens
    projector = model.model.multi_modal_projector
    assert type(projector.act).__name__ == "GELUActivation" and hasattr(projector, "linear_2")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
    )
    assert prompt == "USER: <image>\nDescribe the image. ASSISTANT:"


def test_float16_storage_loads_as_a_float32_model_with_the_rounded_weights(tmp_path):
    model, processor = build_shapesworld_llava(replace(SHAPESWORLD_SPEC, text_layers=2, vision_layers=1))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").stat().st_size
    store_weights_in_float16(tmp_path, keep_float32=())
    assert (tmp_path / "model.safetensors").stat().st_size < 0.55 * before
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name


def test_float16_storage_keeps_the_vision_tower_bit_for_bit(tmp_path):
    model, _ = build_shapesworld_llava(replace(SHAPESWORLD_SPEC, text_layers=2, vision_layers=1))
    model.save_pretrained(tmp_path)
    store_weights_in_float16(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    tower = [name for name in model.state_dict() if ".vision_tower." in f".{name}"]
    assert tower and all(torch.equal(loaded.state_dict()[n], model.state_dict()[n]) for n in tower)
    decoder = loaded.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(decoder, model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"].half().float())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        store_weights_in_float16(tmp_path / "missing")
