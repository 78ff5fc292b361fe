"""Numerical equivalences in float32: two query rows vs two forwards, eviction vs masking."""

import copy

import pytest
import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.rcpp.masks import drcd_attention_mask

ATOL = 1e-5


@pytest.fixture()
def prefilled(rcpp_model, batch2):
    """A VisualKVCache after the prompt's forward, plus what the next step needs."""
    image_mask = batch2["input_ids"] == rcpp_model.config.image_token_id
    valid = batch2["attention_mask"].bool()
    position_ids = (batch2["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    cache = VisualKVCache(config=rcpp_model.config)
    with torch.no_grad():
        rcpp_model.model(**batch2, position_ids=position_ids, past_key_values=cache, use_cache=True)
    cache.register_prompt(position_ids, valid, image_mask)
    next_position = position_ids[:, -1:] + 1
    token = torch.tensor([[7], [9]])
    return cache, token, next_position


def step_logits(model, cache, token, position, mask):
    with torch.no_grad():
        hidden = model.model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        ).last_hidden_state
    return model.lm_head(hidden)


def random_core(batch, num_visual, seed=0):
    """C by visual-token id (every visual token is cached here, so ids and columns coincide)."""
    core = torch.rand(batch, num_visual, generator=torch.Generator().manual_seed(seed)) < 0.5
    core[:, 0], core[:, 1] = True, False  # both groups non-empty in every row
    return core


def test_two_rows_equal_two_masked_forwards(rcpp_model, prefilled):
    cache, token, position = prefilled
    core = random_core(2, cache.num_visual_tokens)
    main_cache, contrast_cache = copy.deepcopy(cache), copy.deepcopy(cache)

    both = step_logits(
        rcpp_model, cache, token.expand(-1, 2), position.expand(-1, 2),
        drcd_attention_mask(cache.valid, cache.visual_ids, core, ~core, 2),
    )
    logits_core = step_logits(
        rcpp_model, main_cache, token, position, drcd_attention_mask(main_cache.valid, main_cache.visual_ids, core, ~core, 1)
    )
    logits_noise = step_logits(
        rcpp_model, contrast_cache, token, position,
        drcd_attention_mask(contrast_cache.valid, contrast_cache.visual_ids, ~core, core, 1),
    )
    torch.testing.assert_close(both[:, 0], logits_core[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(both[:, 1], logits_noise[:, 0], atol=ATOL, rtol=0)
    assert not torch.allclose(logits_core, logits_noise, atol=1e-3), "the two groups must make a difference"

    # Dropping the contrast row's entry leaves exactly the main branch's cache.
    cache.drop_last_entries(1)
    for layer, reference in zip(cache.layers, main_cache.layers):
        torch.testing.assert_close(layer.keys, reference.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.values, reference.values, atol=ATOL, rtol=0)


def test_eviction_equals_masking(rcpp_model, prefilled):
    cache, token, position = prefilled
    masked_cache = copy.deepcopy(cache)
    length_before = cache.get_seq_length()
    original_positions = cache.positions.clone()
    columns = torch.tensor([[0, 3, 5, 6, 11], [2, 3, 7, 14, 15]])  # per-row visual columns, 5 each
    evicted_slots = cache.visual_slots.gather(1, columns)

    kept_columns = cache.evict_visual(columns)

    # Every layer shrinks by exactly the evicted count; kept entries keep their original positions.
    assert all(layer.keys.shape[2] == length_before - 5 for layer in cache.layers)
    assert all(layer.values.shape[2] == length_before - 5 for layer in cache.layers)
    assert cache.num_visual_tokens == masked_cache.num_visual_tokens - 5
    for row in range(2):
        keep = torch.ones(length_before, dtype=torch.bool)
        keep[evicted_slots[row]] = False
        assert torch.equal(cache.positions[row], original_positions[row][keep])
        assert not set(columns[row].tolist()) & set(kept_columns[row].tolist())
        assert torch.equal(cache.visual_token_ids[row], masked_cache.visual_token_ids[row][kept_columns[row]])

    evicted = step_logits(
        rcpp_model, cache, token, position, torch.cat([cache.valid, torch.ones(2, 1, dtype=torch.bool)], 1).long()
    )
    keep_visual = torch.ones_like(masked_cache.visual_token_ids, dtype=torch.bool).scatter(1, columns, False)
    masked = step_logits(
        rcpp_model, masked_cache, token, position,
        drcd_attention_mask(masked_cache.valid, masked_cache.visual_ids, keep_visual, ~keep_visual, 1),
    )
    torch.testing.assert_close(evicted, masked, atol=ATOL, rtol=0)


def test_evict_rejects_duplicate_columns(prefilled):
    cache, _, _ = prefilled
    with pytest.raises(ValueError, match="distinct"):
        cache.evict_visual(torch.tensor([[1, 1], [2, 3]]))
