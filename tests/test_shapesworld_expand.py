"""Block expansion (LLaMA Pro): the deepened model computes exactly what the source did, and trains from there."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from rcpp_hf.shapesworld.expand import (
    expand_decoder,
    shared_token_rows,
    source_positions,
)
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.shapesworld.train import TrainConfig, batch_scenes, train, training_batch
from rcpp_hf.tiny import build_tiny_llava, build_tokenizer

SHALLOW = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                  text_hidden=32, text_layers=2, num_heads=4, num_kv_heads=2)  # fmt: skip
DEEP = replace(SHALLOW, text_layers=6)


def test_source_positions_keep_order_and_spread_evenly():
    assert source_positions(4, 12) == [0, 3, 6, 9]
    assert source_positions(2, 2) == [0, 1]
    with pytest.raises(ValueError, match="4-layer decoder cannot be expanded evenly to 10"):
        source_positions(4, 10)


def test_expanded_model_gives_the_source_logits_exactly_in_float32():
    source, processor = build_shapesworld_llava(SHALLOW, seed=1)
    vocab = processor.tokenizer.get_vocab()
    deep = expand_decoder(source, build_shapesworld_llava(DEEP, seed=2)[0], vocab, vocab)
    batch = training_batch(processor, batch_scenes(0, 0, 2), SHALLOW.num_visual_tokens)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}
    with torch.no_grad():
        assert torch.equal(deep(**inputs).logits, source(**inputs).logits)
    # The new blocks are not copies: their non-output weights are the deep model's own initialisation.
    layers = deep.model.language_model.layers
    assert not torch.equal(layers[1].self_attn.q_proj.weight, layers[0].self_attn.q_proj.weight)
    assert not layers[1].self_attn.o_proj.weight.any() and not layers[1].mlp.down_proj.weight.any()


def test_expansion_refuses_another_width():
    source = build_shapesworld_llava(SHALLOW)[0]
    wider = build_shapesworld_llava(replace(DEEP, text_hidden=48))[0]
    vocab = {"a": 0}
    with pytest.raises(ValueError, match="hidden_size differs"):
        expand_decoder(source, wider, vocab, vocab)


def test_rows_move_by_token_string_between_tokenizers():
    assert [t.tolist() for t in shared_token_rows({"a": 0, "b": 1, "c": 2}, {"c": 0, "x": 1, "a": 2})] == [[2, 0], [0, 2]]
    with pytest.raises(ValueError, match="share no token"):
        shared_token_rows({"a": 0}, {"b": 0})


def test_expanded_model_under_a_larger_tokenizer_gives_the_source_logits_on_shared_tokens():
    # The v1 -> v2 situation: the target's tokenizer was trained on a larger corpus (new question words).
    small = build_tokenizer(300, ["a red star left of a blue moon.", "Is there a star in the image?"])
    large = build_tokenizer(340, ["a red star left of a blue moon.", "Is there a star in the image?", "How many stars? Two"])
    source = build_tiny_llava(replace(SHALLOW, seed=1), tokenizer=small)[0]
    target = build_tiny_llava(replace(DEEP, seed=2), tokenizer=large)[0]
    expand_decoder(source, target, small.get_vocab(), large.get_vocab())
    text = "a red star left of a blue moon."
    assert small.tokenize(text) == large.tokenize(text)
    source_ids, target_ids = shared_token_rows(small.get_vocab(), large.get_vocab())
    with torch.no_grad():
        source_logits = source(input_ids=small(text, return_tensors="pt").input_ids).logits
        target_logits = target(input_ids=large(text, return_tensors="pt").input_ids).logits
    # The same sums, but the head multiplies a wider matrix: on some CPUs its threads split it differently.
    torch.testing.assert_close(target_logits[..., target_ids], source_logits[..., source_ids], rtol=0, atol=1e-6)


def test_training_from_a_shallow_checkpoint_starts_at_its_weights_and_keeps_a_frozen_vision_tower(tmp_path):
    source, processor = build_shapesworld_llava(SHALLOW, seed=1)
    source.save_pretrained(tmp_path / "shallow")
    processor.save_pretrained(tmp_path / "shallow")
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, save_every=1, init_from=str(tmp_path / "shallow"),
                         freeze_vision=True, patch_loss_weight=0.0)  # fmt: skip
    folder = train(config, tmp_path / "deep", spec=DEEP, progress=False)
    before, after = load_file(tmp_path / "shallow" / "model.safetensors"), load_file(folder / "model.safetensors")
    vision = [k for k in before if k.startswith("vision_tower.")]  # the saved (llava-hf) key layout
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    new_block = "language_model.model.layers.1.self_attn.o_proj.weight"  # zero at the start, trained since
    assert after[new_block].any()


def test_training_config_refuses_a_patch_probe_on_a_frozen_tower_and_a_missing_source(tmp_path):
    with pytest.raises(ValueError, match="patch_loss_weight"):
        TrainConfig(freeze_vision=True)
    config = TrainConfig(steps=2, warmup_steps=1, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(config, tmp_path / "out", spec=DEEP, progress=False)
