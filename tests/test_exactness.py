"""With RCPP off or neutral, generation is token-identical to vanilla LLaVA generate."""

import pytest
import torch
from transformers import GenerationConfig

from rcpp_hf import RCPPGenerationConfig
from tests.conftest import neutral_config

SAMPLING = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)


def run(model, inputs, generation_config, seed=0):
    torch.manual_seed(seed)
    out = model.generate(**inputs, generation_config=generation_config)
    return out.sequences if hasattr(out, "sequences") else out


@pytest.mark.parametrize("batch_name", ["batch1", "batch2"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize(
    "make_config",
    [
        lambda **kw: GenerationConfig(**kw),
        lambda **kw: RCPPGenerationConfig(rcpp=False, **kw),
        lambda **kw: neutral_config(**kw),
    ],
    ids=["plain", "rcpp_off", "neutral"],
)
def test_token_identical_to_vanilla(request, vanilla_model, rcpp_model, batch_name, sampling, make_config):
    inputs = request.getfixturevalue(batch_name)
    kwargs = dict(max_new_tokens=16, **(SAMPLING if sampling else dict(do_sample=False)))
    expected = run(vanilla_model, inputs, GenerationConfig(**kwargs))
    actual = run(rcpp_model, inputs, make_config(**kwargs))
    assert torch.equal(actual, expected)


def test_neutral_records_scores_without_changing_tokens(rcpp_model, vanilla_model, batch2):
    out = rcpp_model.generate(**batch2, generation_config=neutral_config(max_new_tokens=6), return_dict_in_generate=True)
    expected = vanilla_model.generate(**batch2, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.sequences, expected)
    assert len(out.rcpp.steps) == 6
    for step in out.rcpp.steps:
        assert torch.isfinite(step.scores).all()
        assert (step.num_noise == 0).all() and step.evicted.shape[1] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_neutral_identical_in_half_precision(tiny_path, batch2, dtype):
    from transformers import LlavaForConditionalGeneration

    from rcpp_hf import RCPPLlavaForConditionalGeneration

    vanilla = LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=dtype)
    rcpp = RCPPLlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch2.items()}
    expected = vanilla.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(rcpp.generate(**inputs, generation_config=neutral_config(max_new_tokens=8)), expected)
