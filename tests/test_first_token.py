"""The first-token action: step 0 decoded from DRCD's two rows of the last prompt token."""

import copy

import pytest
import torch
from transformers import GenerationConfig

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.methods import load_method
from rcpp_hf.rcpp.masks import drcd_attention_mask
from tests.conftest import active_config, make_images, neutral_config
from tests.test_exactness import SAMPLING, run
from tests.test_generation import count_forwards

ATOL = 1e-5
# tau as the median of S: both groups are non-empty in every row of the tiny model, whatever its score scale.
SPLIT = dict(tau=0.5, tau_mode="quantile", lambda_end=3.0, keep_ratio_end=1.0)


def generate(model, inputs, config):
    return model.generate(**inputs, generation_config=config, return_dict_in_generate=True, output_logits=True)


def masked_forward(model, cache, token, position, mask):
    """One forward of `token` (B, 1) at `position` with a 4-D bool mask over `cache` + itself -> logits (B, vocab)."""
    with torch.no_grad():
        hidden = model.model(input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache,
                             use_cache=True).last_hidden_state  # fmt: skip
    return model.lm_head(hidden)[:, 0]


def test_two_rows_equal_two_masked_forwards_of_the_last_prompt_token(rcpp_model, batch2):
    """Batch 2, left-padded: the fused first-token logits and the cache equal those of two separate forwards of the
    last prompt token over the cache of the rest of the prompt, one seeing C, one seeing N."""
    config = active_config(max_new_tokens=1, first_token_action=True, **SPLIT)
    out = generate(rcpp_model, batch2, config)
    core = out.rcpp.steps[0].scores >= out.rcpp.steps[0].scores.quantile(0.5, dim=1, keepdim=True,
                                                                           interpolation="lower")  # fmt: skip
    assert core.any(dim=1).all() and (~core).any(dim=1).all(), "both groups non-empty in every row"
    assert torch.equal(out.rcpp.steps[0].num_noise, (~core).sum(dim=1))

    # Reference: the prompt but its last token, then that token alone, once per group, each on its own cache.
    rest = {"input_ids": batch2["input_ids"][:, :-1], "attention_mask": batch2["attention_mask"][:, :-1]}
    positions = (batch2["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    main_cache = VisualKVCache(config=rcpp_model.config)
    with torch.no_grad():
        plain = rcpp_model(**batch2).logits[:, -1]
        rcpp_model.model(**rest, pixel_values=batch2["pixel_values"], position_ids=positions[:, :-1],
                         past_key_values=main_cache, use_cache=True)  # fmt: skip
    main_cache.register_prompt(positions[:, :-1], rest["attention_mask"].bool(),
                               rest["input_ids"] == rcpp_model.config.image_token_id)  # fmt: skip
    contrast_cache = copy.deepcopy(main_cache)
    last, position = batch2["input_ids"][:, -1:], positions[:, -1:]
    logits_core = masked_forward(rcpp_model, main_cache, last, position,
                                 drcd_attention_mask(main_cache.valid, main_cache.visual_ids, core, ~core, 1))
    logits_noise = masked_forward(rcpp_model, contrast_cache, last, position,
                                  drcd_attention_mask(contrast_cache.valid, contrast_cache.visual_ids, ~core, core, 1))

    fused = logits_core - config.lambda_end * logits_noise
    torch.testing.assert_close(out.logits[0], fused, atol=10 * ATOL, rtol=0)
    assert not torch.allclose(out.logits[0], plain, atol=1e-3), "the action must change the first token's logits"
    # The cache keeps the main row's entry for the last prompt token, in place of the prefill's.
    for layer, reference in zip(out.past_key_values.layers, main_cache.layers):
        torch.testing.assert_close(layer.keys, reference.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.values, reference.values, atol=ATOL, rtol=0)
    assert torch.equal(out.past_key_values.positions, positions)


@pytest.mark.parametrize("batch_name", ["batch1", "batch2"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize(
    "make_config",
    [
        lambda **kw: neutral_config(first_token_action=True, **kw),
        lambda **kw: active_config(first_token_action=True, tau=0.0, tau_mode="quantile", keep_ratio_end=1.0, **kw),
    ],
    ids=["lambda_0", "n_empty"],
)
def test_neutral_first_token_action_is_vanilla(request, vanilla_model, rcpp_model, batch_name, sampling, make_config):
    inputs = request.getfixturevalue(batch_name)
    kwargs = dict(max_new_tokens=8, **(SAMPLING if sampling else dict(do_sample=False)))
    expected = run(vanilla_model, inputs, GenerationConfig(**kwargs))
    query_lengths, handle = count_forwards(rcpp_model)
    try:
        actual = run(rcpp_model, inputs, make_config(**kwargs))
    finally:
        handle.remove()
    assert torch.equal(actual, expected)
    assert len(query_lengths) == 8, "no extra forward when there is nothing to contrast"


def test_lambda_0_with_noise_changes_nothing_at_step_0(rcpp_model, batch2):
    """With lambda_end = 0 the action has nothing to contrast: no re-run, the same tokens as with it off."""
    config = dict(max_new_tokens=6, lambda_start=0.0, lambda_end=0.0, tau=0.5, tau_mode="quantile")
    off = rcpp_model.generate(**batch2, generation_config=active_config(**config))
    on = generate(rcpp_model, batch2, active_config(first_token_action=True, **config))
    assert torch.equal(on.sequences, off)
    assert int(on.rcpp.steps[0].num_noise.min()) > 0 and not on.rcpp.steps[0].contrast


@pytest.mark.parametrize("batch_name", ["batch1", "batch2"])
def test_exactly_one_extra_forward_per_generate_call(request, rcpp_model, batch_name):
    inputs = request.getfixturevalue(batch_name)
    counts = {}
    for action in (False, True):
        query_lengths, handle = count_forwards(rcpp_model)
        try:
            out = generate(rcpp_model, inputs, active_config(max_new_tokens=6, first_token_action=action, **SPLIT))
        finally:
            handle.remove()
        counts[action] = query_lengths
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 6
    prompt_length = inputs["input_ids"].shape[1]
    assert counts[False][0] == counts[True][0] == prompt_length
    assert len(counts[True]) == len(counts[False]) + 1 == 7
    assert counts[True][1] == 2, "the extra forward: the last prompt token as two rows"
    assert counts[True][2:] == counts[False][1:]


def test_trace_records_the_action(rcpp_model, batch2):
    config = active_config(max_new_tokens=4, first_token_action=True, **SPLIT)
    on = generate(rcpp_model, batch2, config).rcpp.steps[0]
    off = generate(rcpp_model, batch2, active_config(max_new_tokens=4, **SPLIT)).rcpp.steps[0]
    assert on.contrast and on.lambda_t == config.lambda_end
    assert torch.equal(on.num_noise, torch.full((2,), 7))  # 16 tokens, median quantile: the 7 below the 8th smallest
    assert torch.equal(on.num_core + on.num_noise, torch.full((2,), 16))
    assert not off.contrast and off.lambda_t == 0.0 and int(off.num_noise.sum()) == 0
    # S is the prefill's, with or without the action.
    torch.testing.assert_close(on.scores, off.scores, atol=0, rtol=0)


def test_composes_with_a_prefill_pruner(rcpp_model, batch2):
    """Pruned layers hold fewer entries; the action replaces the last one in each, adding none."""
    fastv = load_method({"method": "fastv", "keep": 8, "layer": 2})
    lengths = {}
    for action in (False, True):
        config = active_config(max_new_tokens=4, first_token_action=action, methods=(fastv,), **SPLIT)
        out = generate(rcpp_model, batch2, config)
        lengths[action] = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert out.rcpp.steps[0].contrast == action
    assert lengths[True] == lengths[False] and len(set(lengths[True])) == 2


def test_prompt_ending_with_an_image_is_refused(rcpp_model, processor):
    inputs = processor(images=make_images(1), text=["USER: Describe. <image>"], return_tensors="pt")
    with pytest.raises(ValueError, match="first_token_action"):
        rcpp_model.generate(**inputs, generation_config=active_config(max_new_tokens=2, first_token_action=True, **SPLIT))
