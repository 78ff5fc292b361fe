"""`rcpp_hf.from_pretrained` picks the rcpp_hf class from the checkpoint's model type and refuses the others."""

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

import rcpp_hf
from rcpp_hf import RCPPLlavaForConditionalGeneration
from rcpp_hf.auto import RCPP_CLASSES, rcpp_class_for


def test_a_llava_checkpoint_loads_as_the_rcpp_llava_class_with_the_kwargs_passed_on(tiny_path):
    model = rcpp_hf.from_pretrained(tiny_path, dtype=torch.float16, attn_implementation="eager")
    assert type(model) is RCPPLlavaForConditionalGeneration
    assert model.dtype == torch.float16
    assert model.config.text_config._attn_implementation == "eager"


def test_every_supported_model_type_maps_to_a_class_of_its_own_config():
    for model_type, cls in RCPP_CLASSES.items():
        assert cls.config_class.model_type == model_type
        assert rcpp_class_for(AutoConfig.for_model(model_type)) is cls


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(tmp_path):
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'llama'.*supported: \['llava'"):
        rcpp_hf.from_pretrained(tmp_path)
