"""LLaVA-NeXT and LLaVA-OneVision: with no method on, the rcpp_hf classes are their stock transformers classes
(logits, attention maps, generate, for eager and sdpa, on a batch whose rows' images differ in size), load every
weight and initialise missing ones as the stock class; `rcpp_hf.from_pretrained` picks them."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

import rcpp_hf
from rcpp_hf import RCPPGenerationConfig
from rcpp_hf.auto import RCPP_CLASSES
from rcpp_hf.tiny_families import BUILDERS, save_tiny_family
from tests.conftest import (
    ANYRES_TYPES,
    EQUAL_SIZES,
    RAGGED_SIZES,
    active_config,
    anyres_batch,
    assert_same_weights,
    load_pair,
    neutral_config,
    row_alone,
)

IMPLEMENTATIONS = ["eager", "sdpa"]


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_the_tiny_models_lay_out_anyres_images(anyres_paths, model_type):
    """Different image sizes give the rows different image-token counts; equal sizes equal counts."""
    config = RCPP_CLASSES[model_type].config_class.from_pretrained(anyres_paths[model_type])
    for sizes, counts in ((RAGGED_SIZES, [52, 56]), (EQUAL_SIZES, [52, 52])):
        batch = anyres_batch(anyres_paths[model_type], sizes)
        assert (batch["input_ids"] == config.image_token_id).sum(dim=1).tolist() == counts
        assert batch["pixel_values"].shape[:2] == (2, 5)  # a base tile and a 2 x 2 grid


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_methods_off_the_subclass_is_the_stock_class(anyres_paths, model_type, implementation):
    stock, ours = load_pair(anyres_paths[model_type], model_type, implementation)
    batch = anyres_batch(anyres_paths[model_type], RAGGED_SIZES)
    eager = implementation == "eager"
    with torch.no_grad():
        expected, actual = stock(**batch, output_attentions=eager), ours(**batch, output_attentions=eager)
    assert torch.equal(actual.logits, expected.logits)
    if eager:
        assert len(actual.attentions) == stock.config.text_config.num_hidden_layers
        for got, want in zip(actual.attentions, expected.attentions):
            assert torch.equal(got, want)
    plain = dict(max_new_tokens=8, do_sample=False)
    reference = stock.generate(**batch, generation_config=GenerationConfig(**plain))
    assert torch.equal(ours.generate(**batch, generation_config=GenerationConfig(**plain)), reference)
    assert torch.equal(ours.generate(**batch, generation_config=RCPPGenerationConfig(rcpp=False, **plain)), reference)


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_neutral_rcpp_decodes_as_the_stock_class(anyres_paths, model_type):
    stock, ours = load_pair(anyres_paths[model_type], model_type)
    batch = anyres_batch(anyres_paths[model_type], EQUAL_SIZES)
    expected = stock.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**batch, generation_config=neutral_config(max_new_tokens=8)), expected)


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_every_weight_is_loaded(tmp_path, model_type):
    """Each parameter of the subclass's load is the built model's (no key renamed away and drawn at random)."""
    built, _ = BUILDERS[model_type]()
    folder = save_tiny_family(tmp_path, model_type)  # the same seed builds the same weights
    _, ours = load_pair(folder, model_type)
    assert_same_weights(built, ours)


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_missing_weights_are_initialised_as_the_stock_class_does(tmp_path, model_type):
    folder = save_tiny_family(tmp_path, model_type)
    weights = load_file(folder / "model.safetensors")
    missing = [name for name in weights if "layers.1." in name or "image_newline" in name or "projector" in name]
    assert len(missing) > 10
    save_file({k: v for k, v in weights.items() if k not in missing}, folder / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    stock, ours = load_pair(folder, model_type, seed=3)
    assert_same_weights(stock, ours)


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_rcpp_drcd_contrasts_and_evicts(anyres_paths, model_type):
    """RCPP + DRCD's acting settings on the anyres image: the contrast row is used and the cache's visual tokens
    shrink to the scheduled share of the image's 52 tokens."""
    _, ours = load_pair(anyres_paths[model_type], model_type)
    batch = anyres_batch(anyres_paths[model_type], EQUAL_SIZES)
    config = active_config(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    out = ours.generate(**batch, generation_config=config)
    assert any(bool(step.num_noise.sum()) and step.contrast for step in out.rcpp.steps)
    evicted = sum(step.evicted.shape[1] for step in out.rcpp.steps)
    assert evicted == 52 - 13 and out.past_key_values.num_visual_tokens == 13  # keep_ratio_end 0.25 of 52


def test_config_shapes_give_the_most_visual_tokens_an_image_gets(anyres_paths):
    """Read from the config alone (checks made before loading): the tiny models' 2 x 2 grid (16 + 8 x 8 + 8 = 88,
    the largest count `test_the_tiny_models_lay_out_anyres_images`' images reach), llava-hf's LLaVA-1.6 layout
    (576 + 48 x 48 + 48) and OneVision's: `anyres_max_9` shrinks its 6 x 6 grid to 81 x 81 tokens, and its most is a
    5 x 2 grid of 135 x 54 that the shrinking leaves (ratio 1.05, under its 1.1 threshold)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaOnevisionConfig

    from rcpp_hf.auto import model_shape

    for path in anyres_paths.values():
        assert model_shape(path) == (4, 88)
    next_7b = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                              vision_feature_select_strategy="default")  # fmt: skip
    assert model_shape(next_7b) == (32, 576 + 48 * 48 + 48)
    onevision = LlavaOnevisionConfig()
    assert model_shape(onevision) == (onevision.text_config.num_hidden_layers, 729 + 135 * 54 + 135)


def test_take_rows_left_pads_the_rows_that_keep_fewer_entries():
    """Kept entries stay in order at their positions; the shorter row gets invalid, non-visual entries in front."""
    from rcpp_hf.engine.layout import TokenLayout

    positions = torch.arange(6).expand(2, -1)
    layout = TokenLayout(positions, torch.ones(2, 6, dtype=torch.bool), torch.tensor([[-1, 0, 1, 2, 3, -1]] * 2))
    keep = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 0, 1, 0, 1]], dtype=torch.bool)
    taken, index = layout.take_rows(keep)
    assert index.tolist() == [[0, 1, 3, 4, 5], [0, 0, 0, 3, 5]]
    assert taken.valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert taken.visual_ids.tolist() == [[-1, 0, 2, 3, -1], [-1, -1, -1, 2, -1]]
    assert taken.positions[1, 2:].tolist() == [0, 3, 5] and taken.visual_counts == (3, 1)
    assert taken.visual_token_ids.tolist() == [[0, 2, 3], [2, -1, -1]]  # padding slots: id -1


def test_onevision_refuses_a_decoder_with_sliding_window_layers(anyres_paths):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(anyres_paths["llava_onevision"])
    config.text_config.use_sliding_window, config.text_config.sliding_window = True, 8
    config.text_config.layer_types = ["full_attention", "sliding_attention"] * 2
    model = rcpp_hf.from_pretrained(anyres_paths["llava_onevision"], config=config)
    assert model.model.language_model.has_sliding_layers
    batch = anyres_batch(anyres_paths["llava_onevision"], EQUAL_SIZES)
    with pytest.raises(ValueError, match="sliding-window layers .*use_sliding_window=False"):
        model.generate(**batch, generation_config=active_config(max_new_tokens=2))


@pytest.mark.parametrize("model_type", ANYRES_TYPES)
def test_rcpp_drcd_on_rows_whose_images_differ_in_size(anyres_paths, model_type):
    """Rows of 52 and 56 visual tokens: each keeps the scheduled share of its own image (a quarter: 13 and 14) and
    decodes as it does alone; consumed-evidence gating, which compares rows of one count, refuses them."""
    _, ours = load_pair(anyres_paths[model_type], model_type)
    batch = anyres_batch(anyres_paths[model_type], RAGGED_SIZES)
    config = active_config(max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    out = ours.generate(**batch, generation_config=config)
    assert out.past_key_values.layouts[-1].visual_counts == (13, 14)
    evicted = torch.stack([(step.evicted >= 0).sum(dim=1) for step in out.rcpp.steps]).sum(dim=0)
    assert evicted.tolist() == [52 - 13, 56 - 14] and any(step.contrast for step in out.rcpp.steps)
    for step in out.rcpp.steps:  # each row's scores over its own image; padding columns are not reported
        assert step.scores.shape == (2, 56) and (step.num_core + step.num_noise).tolist() == [
            int(count) for count in torch.isfinite(step.scores).sum(dim=1)]
    prompt = batch["input_ids"].shape[1]
    for row in range(2):
        alone = row_alone(batch, row)
        generated = ours.generate(**alone, generation_config=config).sequences[0, alone["input_ids"].shape[1]:]
        assert out.sequences[row, prompt : prompt + len(generated)].tolist() == generated.tolist()
    with pytest.raises(ValueError, match=r"evidence_gating takes rows of one visual-token count, got \[52, 56\]"):
        ours.generate(**batch, generation_config=active_config(max_new_tokens=2, evidence_gating=True))
