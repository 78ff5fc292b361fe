"""Bad input gets a clear error naming the problem."""

import pytest
import torch

from rcpp_hf import RCPPGenerationConfig
from tests.conftest import PROMPTS, active_config, make_images


def test_no_image_tokens(rcpp_model, processor):
    inputs = processor.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="need image tokens"):
        rcpp_model.generate(**inputs, generation_config=active_config(max_new_tokens=3))


def test_image_token_count_not_matching_features(rcpp_model, batch1):
    image_token = rcpp_model.config.image_token_id
    input_ids = batch1["input_ids"].clone()
    first = int((input_ids[0] == image_token).nonzero()[0])
    input_ids[0, first] = 5  # one image token fewer than the image's features
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        rcpp_model.generate(input_ids=input_ids, pixel_values=batch1["pixel_values"],
                            generation_config=active_config(max_new_tokens=3))


def test_rows_with_different_numbers_of_images(rcpp_model, processor):
    inputs = processor(
        images=make_images(3),
        text=["USER: <image> <image>\nCompare. ASSISTANT:", PROMPTS[1]],
        return_tensors="pt",
        padding=True,
    )
    with pytest.raises(ValueError, match="same number of images"):
        rcpp_model.generate(**inputs, generation_config=active_config(max_new_tokens=3))


@pytest.mark.parametrize("layers", [(4,), (-5,), (0, -4)])
def test_scoring_layer_out_of_range(rcpp_model, batch1, layers):
    with pytest.raises(ValueError, match="scoring_layers"):
        rcpp_model.generate(**batch1, generation_config=active_config(max_new_tokens=3, scoring_layers=layers))


def test_invalid_gamma_passed_to_generate(rcpp_model, batch1):
    with pytest.raises(ValueError, match="gamma"):
        rcpp_model.generate(**batch1, generation_config=active_config(max_new_tokens=3), gamma=1.0)


@pytest.mark.parametrize("value", [0.0, 1.01])
def test_keep_ratio_outside_unit_interval(value):
    with pytest.raises(ValueError, match="keep_ratio_end"):
        RCPPGenerationConfig(keep_ratio_end=value)


def test_beam_search_is_refused_with_rcpp_and_allowed_without(rcpp_model, vanilla_model, batch1):
    with pytest.raises(ValueError, match="greedy decoding and sampling"):
        rcpp_model.generate(**batch1, generation_config=active_config(max_new_tokens=3, num_beams=2))
    plain = rcpp_model.generate(**batch1, max_new_tokens=3, num_beams=2)
    assert torch.equal(plain, vanilla_model.generate(**batch1, max_new_tokens=3, num_beams=2))


@pytest.mark.parametrize("option", ["output_attentions", "output_hidden_states"])
def test_unsupported_outputs_are_refused(rcpp_model, batch1, option):
    with pytest.raises(ValueError, match=option):
        rcpp_model.generate(**batch1, generation_config=active_config(max_new_tokens=3),
                            return_dict_in_generate=True, **{option: True})
