"""What a decode step reuses instead of recomputing equals what it would recompute."""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rcpp_hf.engine.attention import rotate_queries
from rcpp_hf.engine.layout import VISUAL_VIEWS, TokenLayout
from rcpp_hf.rcpp.masks import drcd_attention_mask
from rcpp_hf.rcpp.tap import RCPPTap


def padded_prompt() -> TokenLayout:
    """Two rows, the second left-padded by one; 3 visual tokens each at different entries."""
    image = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return TokenLayout.prompt(positions, valid, image)


def test_extended_layout_keeps_the_visual_views_it_would_recompute():
    prompt = padded_prompt()
    assert prompt.num_visual == 3
    assert torch.equal(prompt.visual_slots, torch.tensor([[1, 2, 3], [2, 3, 4]]))
    assert torch.equal(prompt.visual_token_ids, torch.tensor([[0, 1, 2], [0, 1, 2]]))
    extended = prompt.extend(torch.tensor([[6], [5]]))
    fresh = TokenLayout(extended.positions, extended.valid, extended.visual_ids)
    for view in VISUAL_VIEWS:
        assert view in extended.__dict__, f"{view} was not carried over"
        assert torch.equal(torch.as_tensor(getattr(extended, view)), torch.as_tensor(getattr(fresh, view)))
    # An eviction gives a new layout whose views are computed afresh.
    dropped, _ = extended.without_visual(torch.tensor([[1], [0]]))
    assert dropped.num_visual == 2
    assert torch.equal(dropped.visual_token_ids, torch.tensor([[0, 2], [1, 2]]))


def test_rotate_queries_is_the_query_half_of_apply_rotary_pos_emb():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 8, generator=generator)
    cos, sin = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 3, 8, generator=generator)
    expected, _ = apply_rotary_pos_emb(query, query, cos, sin)
    assert torch.equal(rotate_queries(query, cos, sin), expected)


def test_rcpp_mask_is_rebuilt_for_new_rows_and_new_layouts():
    past = padded_prompt()
    queries = TokenLayout(torch.tensor([[6, 6], [5, 5]]), torch.ones(2, 2, dtype=torch.bool), torch.full((2, 2), -1))
    core = torch.tensor([[True, False, True], [False, True, True]])
    tap = RCPPTap([0, 1])
    tap.set_rows(2, core, ~core)
    first = tap.layer_mask(0, past, queries)
    assert torch.equal(first, drcd_attention_mask(past.valid, past.visual_ids, core, ~core, 2))
    assert tap.layer_mask(1, past, queries) is first  # layers holding the same entries share it

    tap.set_rows(2, ~core, core)  # new groups, same cached entries
    assert torch.equal(tap.layer_mask(0, past, queries), drcd_attention_mask(past.valid, past.visual_ids, ~core, core, 2))
    grown = past.extend(torch.tensor([[6], [5]]))  # next step: one more cached entry
    later = tap.layer_mask(0, grown, queries)
    assert torch.equal(later, drcd_attention_mask(grown.valid, grown.visual_ids, ~core, core, 2))
    tap.set_rows(1, None, None)
    assert tap.layer_mask(0, grown, queries) is None
