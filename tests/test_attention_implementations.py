"""The subclass honours the attention implementation users ask for, exactly like the stock class."""

import pytest
import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration

from rcpp_hf import RCPPLlavaForConditionalGeneration
from tests.conftest import active_config

IMPLEMENTATIONS = ["eager", "sdpa", {"text_config": "eager", "vision_config": "sdpa"}]


def load_pair(path, implementation):
    stock = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=implementation).eval()
    ours = RCPPLlavaForConditionalGeneration.from_pretrained(path, attn_implementation=implementation).eval()
    return stock, ours


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=str)
def test_same_implementation_outputs_and_attention_maps(varied_tiny_path, batch2, implementation):
    stock, ours = load_pair(varied_tiny_path, implementation)
    for sub in ("text_config", "vision_config"):
        assert getattr(ours.config, sub)._attn_implementation == getattr(stock.config, sub)._attn_implementation
    eager_text = stock.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        expected = stock(**batch2, output_attentions=eager_text)
        actual = ours(**batch2, output_attentions=eager_text)
    assert torch.equal(actual.logits, expected.logits)
    if eager_text:
        assert len(actual.attentions) == 4
        for got, want in zip(actual.attentions, expected.attentions):
            assert torch.equal(got, want)
    plain = GenerationConfig(max_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**batch2, generation_config=plain), stock.generate(**batch2, generation_config=plain))


def test_assisted_decoding_with_eager_attention(varied_tiny_path, batch1):
    stock, ours = load_pair(varied_tiny_path, "eager")
    config = GenerationConfig(max_new_tokens=8, do_sample=False)
    expected = stock.generate(**batch1, generation_config=config, assistant_model=stock)
    assert torch.equal(ours.generate(**batch1, generation_config=config, assistant_model=stock), expected)


def test_rcpp_runs_on_eager_attention_as_on_sdpa(varied_tiny_path, batch2):
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation=implementation)
        config = active_config(max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        out = model.eval().generate(**batch2, generation_config=config)
        assert any(step.num_noise.sum() > 0 for step in out.rcpp.steps), "the contrast row must have been used"
        outputs.append(out)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(outputs[0].rcpp.stacked_scores(), outputs[1].rcpp.stacked_scores(), atol=1e-5, rtol=0, equal_nan=True)


def test_rcpp_refuses_an_implementation_without_dense_masks(varied_tiny_path, batch1):
    model = RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation.*'flex_attention'"):
        model.generate(**batch1, generation_config=active_config(max_new_tokens=2))
