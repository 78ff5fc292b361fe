"""Scoring layers: the default (None) is the last min(4, L) decoder layers, so it fits shallow decoders too."""

from dataclasses import replace

import pytest
import torch

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.methods.rcpp import resolve_scoring_layers
from rcpp_hf.tiny import save_tiny_llava
from tests.conftest import GQA_SPEC, PROMPTS, active_config, make_images


@pytest.mark.parametrize(
    "num_layers, expected", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (32, [28, 29, 30, 31])]
)
def test_default_is_the_last_four_layers_or_all(num_layers, expected):
    assert resolve_scoring_layers(None, num_layers) == expected


def test_explicit_layers_resolve_from_either_end():
    assert resolve_scoring_layers((-1, 0), 3) == [0, 2]
    with pytest.raises(ValueError, match=r"layer -4 is out of range for a decoder with 3 layers \(valid: -3..2\)"):
        resolve_scoring_layers((-4, -1), 3)
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        resolve_scoring_layers((3,), 3)
    with pytest.raises(ValueError, match="name the same layer twice"):
        resolve_scoring_layers((-1, 2), 3)


def test_default_config_records_none_and_round_trips(tmp_path):
    config = RCPPGenerationConfig()
    assert config.scoring_layers is None
    config.to_yaml(tmp_path / "preset.yaml")
    assert "scoring_layers: null" in (tmp_path / "preset.yaml").read_text()
    assert RCPPGenerationConfig.from_yaml(tmp_path / "preset.yaml").scoring_layers is None
    config.save_pretrained(tmp_path)
    assert RCPPGenerationConfig.from_pretrained(tmp_path).scoring_layers is None
    assert RCPPGenerationConfig(scoring_layers=[-2, -1]).scoring_layers == (-2, -1)


@pytest.fixture(scope="module", params=[3, 2], ids=lambda n: f"{n}-layer")
def shallow(request, tmp_path_factory):
    """A tiny LLaVA whose decoder has fewer than 4 layers, its processor's inputs, and its layer count."""
    from transformers import AutoProcessor

    folder = save_tiny_llava(tmp_path_factory.mktemp("shallow"), replace(GQA_SPEC, text_layers=request.param))
    model = RCPPLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(folder)(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")
    return model, inputs, request.param


def test_default_generates_on_a_shallow_decoder_as_every_layer_explicitly(shallow):
    model, inputs, num_layers = shallow

    def scores(**layers):
        config = active_config(max_new_tokens=5, return_dict_in_generate=True, **layers)
        out = model.generate(**inputs, generation_config=config)
        return out.sequences, out.rcpp.stacked_scores().nan_to_num(nan=9.0)  # NaN: evicted

    default = scores()
    assert all(torch.equal(a, b) for a, b in zip(default, scores(scoring_layers=tuple(range(num_layers)))))
    # Fewer layers give other scores: the default did not silently score on a subset.
    assert not torch.equal(default[1], scores(scoring_layers=(-1,))[1])


def test_an_explicit_layer_out_of_range_still_raises_naming_it(shallow):
    model, inputs, num_layers = shallow
    with pytest.raises(ValueError, match=f"layer -4 is out of range for a decoder with {num_layers} layers"):
        model.generate(**inputs, generation_config=active_config(max_new_tokens=2, scoring_layers=(-4, -1)))
