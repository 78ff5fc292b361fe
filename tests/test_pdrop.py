"""PyramidDrop's ranking: the light attention equals the eager attention the next layer computes itself."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from rcpp_hf.methods.pdrop import (
    PDROP_LAYERS,
    PDROP_RATIOS,
    last_instruction_index,
    light_attention,
    pdrop_keep_counts,
)


@pytest.fixture(scope="module")
def llama():
    """Two eager layers; layer 1 plays PDrop's "next layer" (4 query heads share 2 kv heads); large weights so that
    attention is far from uniform."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, attn_implementation="eager",
    )
    return LlamaModel(config).eval()


def eager_row_and_inputs(model, input_ids, attention_mask):
    """Layer 1's own eager probabilities (batch, H, S, S) and the (hidden states, cos/sin) entering it."""
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            output_attentions=True, output_hidden_states=True,
        )
        hidden = out.hidden_states[1]
        cos_sin = model.rotary_emb(hidden, position_ids)
    return out.attentions[1], hidden, cos_sin


def test_defaults_match_the_repository():
    assert PDROP_LAYERS == (8, 16, 24)
    assert PDROP_RATIOS == (0.5, 0.25, 0.125)
    assert pdrop_keep_counts(576) == (288, 144, 72)
    assert pdrop_keep_counts(49) == (24, 12, 6)  # truncated, like the repository's int()


def test_light_attention_equals_eager_attention_of_the_next_layer_with_left_padding(llama):
    input_ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0  # row 1 is left-padded by 3
    eager, hidden, cos_sin = eager_row_and_inputs(llama, input_ids, attention_mask)
    query = last_instruction_index(attention_mask)
    assert query.tolist() == [8, 8]
    with torch.no_grad():
        probs = light_attention(llama.layers[1], hidden, cos_sin, query, attention_mask.bool())
    expected = eager[torch.arange(2), :, query].mean(dim=1)  # (batch, S)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert probs[1, :3].eq(0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


def test_light_attention_is_causal_for_an_earlier_query(llama):
    input_ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(1, 9, dtype=torch.long)
    eager, hidden, cos_sin = eager_row_and_inputs(llama, input_ids, attention_mask)
    with torch.no_grad():
        probs = light_attention(llama.layers[1], hidden, cos_sin, torch.tensor([4]), attention_mask.bool())
    torch.testing.assert_close(probs, eager[:, :, 4].mean(dim=1), atol=1e-5, rtol=0)
    assert probs[0, 5:].eq(0).all()


def test_a_padded_row_equals_the_same_prompt_alone(llama):
    generator = torch.Generator().manual_seed(3)
    alone_ids = torch.randint(0, 50, (1, 6), generator=generator)
    batch_ids = torch.cat([torch.randint(0, 50, (1, 9), generator=generator), torch.cat(
        [torch.zeros(1, 3, dtype=torch.long), alone_ids], dim=1)])
    batch_mask = torch.ones(2, 9, dtype=torch.long)
    batch_mask[1, :3] = 0
    _, hidden, cos_sin = eager_row_and_inputs(llama, batch_ids, batch_mask)
    _, hidden_alone, cos_sin_alone = eager_row_and_inputs(llama, alone_ids, torch.ones(1, 6, dtype=torch.long))
    with torch.no_grad():
        query = last_instruction_index(batch_mask)
        batched = light_attention(llama.layers[1], hidden, cos_sin, query, batch_mask.bool())
        alone_valid = torch.ones(1, 6, dtype=torch.bool)
        alone = light_attention(llama.layers[1], hidden_alone, cos_sin_alone, torch.tensor([5]), alone_valid)
    torch.testing.assert_close(batched[1, 3:], alone[0], atol=1e-6, rtol=0)


def test_last_instruction_index_is_the_last_real_token():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert last_instruction_index(left).tolist() == [3, 3]
    assert last_instruction_index(right).tolist() == [1, 2]


def test_bad_input_names_the_field(llama):
    with pytest.raises(ValueError, match="attention_mask"):
        last_instruction_index(torch.tensor([[0, 0], [1, 1]]))
    with pytest.raises(ValueError, match="ratios"):
        pdrop_keep_counts(576, (0.25, 0.5))
    with pytest.raises(ValueError, match="ratios"):
        pdrop_keep_counts(4, (0.5, 0.1))
    with pytest.raises(ValueError, match="num_visual"):
        pdrop_keep_counts(0)
    hidden = torch.randn(1, 4, 32)
    cos_sin = llama.rotary_emb(hidden, torch.arange(4)[None])
    valid = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="query_index"):
        light_attention(llama.layers[1], hidden, cos_sin, torch.tensor([4]), valid)
    with pytest.raises(ValueError, match="query_index"):
        light_attention(llama.layers[1], hidden, cos_sin, torch.tensor([0]), torch.tensor([[False, True, True, True]]))
    with pytest.raises(ValueError, match="key_valid"):
        light_attention(llama.layers[1], hidden, cos_sin, torch.tensor([3]), valid.long())
    with pytest.raises(ValueError, match="position_embeddings"):
        light_attention(llama.layers[1], hidden, (cos_sin[0][:, :3], cos_sin[1][:, :3]), torch.tensor([3]), valid)
