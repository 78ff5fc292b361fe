"""Qwen2.5-VL and Qwen2-VL: with no method on, the rcpp_hf classes are their stock transformers classes (logits,
attention maps, generate, for eager and sdpa, on a left-padded batch whose rows' images differ in size), load every
weight (the checkpoint key renaming transformers looks up by class name) and initialise missing ones as the stock
class; `rcpp_hf.from_pretrained` picks them; rcpp_hf's loop keeps M-RoPE's 3-D positions (the methods' contract on
these families, with the masked reference at stock positions, is in test_method_contract.py)."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

import rcpp_hf
from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.auto import RCPP_CLASSES, model_shape
from rcpp_hf.methods import load_method
from rcpp_hf.tiny_qwen import TinyQwenSpec, build_tiny_qwen, save_tiny_qwen
from tests.conftest import QWEN_TYPES, active_config, assert_same_weights, load_pair, neutral_config, qwen_batch

IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_the_tiny_models_lay_out_images_at_dynamic_resolution(qwen_paths, model_type):
    """24 x 40 and 32 x 40 pixels: 6 x 10 and 8 x 10 patches, merged 2 x 2 into 15 and 20 image tokens, typed 1 in
    `mm_token_type_ids`; `generate`'s M-RoPE offsets (rope_deltas) differ per row."""
    batch = qwen_batch(qwen_paths[model_type], model_type)
    config = RCPP_CLASSES[model_type].config_class.from_pretrained(qwen_paths[model_type])
    image = batch["input_ids"] == config.image_token_id
    assert batch["image_grid_thw"].tolist() == [[1, 6, 10], [1, 8, 10]]
    assert image.sum(dim=1).tolist() == [15, 20]
    assert torch.equal(batch["mm_token_type_ids"] == 1, image)
    assert batch["pixel_values"].shape[0] == 60 + 80  # patches of both images, flattened


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_methods_off_the_subclass_is_the_stock_class(qwen_paths, model_type, implementation):
    stock, ours = load_pair(qwen_paths[model_type], model_type, implementation)
    batch = qwen_batch(qwen_paths[model_type], model_type)
    eager = implementation == "eager"
    with torch.no_grad():
        expected, actual = stock(**batch, output_attentions=eager), ours(**batch, output_attentions=eager)
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(ours.model.rope_deltas, stock.model.rope_deltas)
    if eager:
        assert len(actual.attentions) == stock.config.text_config.num_hidden_layers
        for got, want in zip(actual.attentions, expected.attentions):
            assert torch.equal(got, want)
    plain = dict(max_new_tokens=8, do_sample=False)
    reference = stock.generate(**batch, generation_config=GenerationConfig(**plain))
    assert torch.equal(ours.generate(**batch, generation_config=GenerationConfig(**plain)), reference)
    assert torch.equal(ours.generate(**batch, generation_config=RCPPGenerationConfig(rcpp=False, **plain)), reference)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_every_weight_is_loaded(tmp_path, model_type):
    """Each parameter of the subclass's load is the built model's. `save_pretrained` writes the legacy
    `model.layers.*` / `visual.*` keys; under a class name transformers has no renaming for, the text decoder
    would be drawn at random (`MethodsGenerationMixin.__init_subclass__`)."""
    built, _ = build_tiny_qwen(model_type)
    folder = save_tiny_qwen(tmp_path, model_type)  # the same seed builds the same weights
    assert any(name.startswith("model.layers.") for name in load_file(folder / "model.safetensors"))
    _, ours = load_pair(folder, model_type)
    assert_same_weights(built, ours)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_missing_weights_are_initialised_as_the_stock_class_does(tmp_path, model_type):
    folder = save_tiny_qwen(tmp_path, model_type)
    weights = load_file(folder / "model.safetensors")
    missing = [name for name in weights if "layers.1." in name or "blocks.0." in name or "merger" in name]
    assert len(missing) > 10
    save_file({k: v for k, v in weights.items() if k not in missing}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    stock, ours = load_pair(folder, model_type, seed=3)
    assert_same_weights(stock, ours)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_neutral_rcpp_decodes_as_the_stock_class(qwen_paths, model_type):
    """rcpp_hf's own decoder loop on M-RoPE positions (the prompt's three rows, then text positions plus
    rope_deltas), on rows of 15 and 20 visual tokens: token for token the stock `generate`."""
    stock, ours = load_pair(qwen_paths[model_type], model_type)
    batch = qwen_batch(qwen_paths[model_type], model_type)
    expected = stock.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**batch, generation_config=neutral_config(max_new_tokens=8)), expected)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_rcpp_drcd_contrasts_and_evicts_per_row(qwen_paths, model_type):
    """RCPP + DRCD's acting settings: the contrast row is used and each row keeps a quarter of its own image."""
    _, ours = load_pair(qwen_paths[model_type], model_type)
    batch = qwen_batch(qwen_paths[model_type], model_type)
    out = ours.generate(**batch, generation_config=active_config(max_new_tokens=8, return_dict_in_generate=True))
    assert any(step.contrast for step in out.rcpp.steps)
    assert out.past_key_values.layouts[-1].visual_counts == (4, 5)  # 0.25 of 15 and 20, 3.75 rounded up


def test_renumbered_positions_refuse_on_m_rope(qwen_paths):
    """PDrop's renumbering of kept tokens' positions has no 3-D counterpart: refused in one line."""
    ours = rcpp_hf.from_pretrained(qwen_paths["qwen2_5_vl"])
    batch = qwen_batch(qwen_paths["qwen2_5_vl"], "qwen2_5_vl")
    config = RCPPGenerationConfig(rcpp=False, methods=[load_method("pdrop", positions="renumbered")], max_new_tokens=2)
    with pytest.raises(ValueError, match="not implemented for M-RoPE's 3-D positions .*positions='original'"):
        ours.generate(**batch, generation_config=config)


def test_config_shape_refuses_naming_the_image_processor(qwen_paths):
    """A Qwen image's visual tokens come from the image processor (max_pixels), not from the model's config."""
    assert TinyQwenSpec().max_visual_tokens == 36
    for model_type, path in qwen_paths.items():
        with pytest.raises(ValueError, match=f"{model_type} image are set by its image processor's max_pixels"):
            model_shape(path)


@pytest.mark.parametrize("model_type", QWEN_TYPES)
def test_pruned_tokens_keep_their_3d_positions(qwen_paths, model_type):
    """FastV on rows of 15 and 20 visual tokens: the deepest layer caches each kept entry at the 3-D position the
    stock `get_rope_index` gave it, the text after the image at its own, and each generated token at its text
    position plus the row's rope delta in all three rows."""
    ours = rcpp_hf.from_pretrained(qwen_paths[model_type], dtype=torch.float32)
    batch = qwen_batch(qwen_paths[model_type], model_type)
    config = RCPPGenerationConfig(rcpp=False, methods=[load_method("fastv", budget=0.4)], max_new_tokens=4,
                                  do_sample=False, return_dict_in_generate=True)  # fmt: skip
    out = ours.generate(**batch, generation_config=config)
    stock_positions, delta = ours.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                       batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    layout = out.past_key_values.layouts[-1]
    assert layout.visual_counts == out.pruning[-1].kept_per_row and max(layout.visual_counts) < 15
    prompt = layout.seq_len - 3  # the 4th token is chosen but never cached
    kept = prompt_entries(layout.positions[:, :prompt], batch["attention_mask"])
    for row in range(2):
        real = layout.valid[row, :prompt]
        expected = stock_positions[:, row].gather(1, kept[row][None].expand(3, -1))
        assert torch.equal(layout.mrope[:, row, :prompt][:, real], expected[:, real])
    generated = layout.positions[:, prompt:] + delta
    assert torch.equal(layout.mrope[:, :, prompt:], generated.expand(3, -1, -1))
    assert not torch.equal(layout.mrope[0], layout.positions)  # the image really moves the text after it


def prompt_entries(text_positions, attention_mask):
    """The prompt column (B, k) of each cached entry, from its text position (0, 1, ... over a row's real tokens)."""
    padding = (attention_mask == 0).sum(dim=1, keepdim=True)
    return (text_positions + padding).clamp(max=attention_mask.shape[1] - 1)
