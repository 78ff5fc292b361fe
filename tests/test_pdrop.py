"""PyramidDrop: the light attention equals the eager attention the next layer computes itself, and the positions
option places the kept and the decoded tokens as the official code does."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.methods import PDrop, load_method, method_from_dict
from rcpp_hf.methods.pdrop import (
    PDROP_LAYERS,
    PDROP_RATIOS,
    last_instruction_index,
    light_attention,
    pdrop_keep_counts,
    renumbered_positions,
)
from tests.conftest import row_alone
from tests.test_prefill_pruning import NUM_VISUAL


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


# -- positions: "original" and "renumbered" ---------------------------------------------------------------------------
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def varied_model(varied_tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(varied_tiny_path, dtype=torch.float32).eval()


def generate_recording(model, batch, method):
    """`generate` with `method`, recording what every decoder layer is called with -> (output, forwards), each
    forward a list of (position_ids, cos) per layer."""
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone()))

    layers = model.model.language_model.layers
    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        config = RCPPGenerationConfig(rcpp=False, methods=[method], max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                                      output_logits=True)  # fmt: skip
        out = model.generate(**batch, generation_config=config)
    finally:
        for hook in hooks:
            hook.remove()
    return out, [calls[i : i + len(layers)] for i in range(0, len(calls), len(layers))]


def kept_from(method, num_layers):
    """Visual tokens each layer holds, from the stages (the image's count before the first)."""
    stages = {stage.layer: stage.keep for stage in method.resolve_stages(num_layers, NUM_VISUAL)}
    kept, per_layer = NUM_VISUAL, []
    for layer in range(num_layers):
        kept = stages.get(layer, kept)
        per_layer.append(kept)
    return per_layer


def check_rope(model, position_ids, cos, expected, valid):
    """The layer ran at `expected` on its valid entries, both as position ids and as the RoPE table it was given."""
    assert position_ids[valid].tolist() == expected[valid].tolist()
    reference = model.model.language_model.rotary_emb(cos, position_ids=expected)[0]
    torch.testing.assert_close(cos[valid], reference[valid], atol=0, rtol=0)


def test_renumbered_positions_follow_the_official_rule(varied_model, batch2):
    """The repository: after a drop, `position_ids[:cur_len] = arange(cur_len)` over the kept sequence; a decoded
    token's position is lowered at each stage layer by the tokens that stage dropped. Computed here from the
    attention mask and the stage counts alone."""
    method = PDrop(positions="renumbered")
    out, forwards = generate_recording(varied_model, batch2, method)
    assert len(forwards) == NEW_TOKENS  # the prefill, then one forward per decoded token but the last
    per_layer = kept_from(method, len(forwards[0]))
    assert per_layer == [16, 8, 4, 2] and [record.kept for record in out.pruning] == per_layer[1:]
    real = batch2["attention_mask"].sum(dim=1)  # (B,) the prompt's real entries
    prompt_len = batch2["input_ids"].shape[1]
    for layer, (position_ids, cos) in enumerate(forwards[0]):
        dropped = NUM_VISUAL - per_layer[layer]
        assert position_ids.shape[1] == prompt_len - dropped
        valid = torch.arange(prompt_len - dropped)[None, :] >= (prompt_len - real)[:, None]  # left padding first
        expected = torch.zeros_like(position_ids)
        for row in range(2):
            expected[row, valid[row]] = torch.arange(int(real[row]) - dropped)  # 0 .. k-1, consecutive
        check_rope(varied_model, position_ids, cos, expected, valid)
    for step, forward in enumerate(forwards[1:]):
        for layer, (position_ids, cos) in enumerate(forward):
            original = real + step  # the decoded token's position in the unpruned sequence
            expected = (original - (NUM_VISUAL - per_layer[layer]))[:, None]
            check_rope(varied_model, position_ids, cos, expected, torch.ones_like(expected, dtype=torch.bool))
    # Each layer's cache is numbered consecutively, decoded entries included, as its keys were rotated.
    for layer, layout in enumerate(out.past_key_values.layouts):
        for row in range(2):
            cached = int(real[row]) - (NUM_VISUAL - per_layer[layer]) + NEW_TOKENS - 1
            assert layout.positions[row, layout.valid[row]].tolist() == list(range(cached))


def test_original_positions_are_kept(varied_model, batch2):
    """The default: kept visual tokens stay at the image's start plus their visual id, text at its own position, and
    a decoded token at its position in the unpruned sequence in every layer."""
    method = PDrop()
    assert method.positions == "original"
    out, forwards = generate_recording(varied_model, batch2, method)
    image = batch2["input_ids"] == varied_model.config.image_token_id
    original = batch2["attention_mask"].cumsum(dim=1) - 1
    valid = batch2["attention_mask"].bool()
    kept_ids = [None, *[record.kept_visual_ids for record in out.pruning]]
    for layer, (position_ids, cos) in enumerate(forwards[0]):
        keep = ~image.clone()
        if kept_ids[layer] is None:
            keep |= image
        else:
            for row in range(2):
                slots = image[row].nonzero().flatten()[kept_ids[layer][row]]
                keep[row, slots] = True
        expected = torch.stack([original[row, keep[row]] for row in range(2)])
        kept_valid = torch.stack([valid[row, keep[row]] for row in range(2)])
        check_rope(varied_model, position_ids, cos, expected, kept_valid)
    real = batch2["attention_mask"].sum(dim=1)
    for step, forward in enumerate(forwards[1:]):
        for position_ids, cos in forward:
            expected = (real + step)[:, None]
            check_rope(varied_model, position_ids, cos, expected, torch.ones_like(expected, dtype=torch.bool))


def test_renumbered_acts_and_decodes_each_row_as_alone(varied_model, batch2):
    original, _ = generate_recording(varied_model, batch2, PDrop())
    renumbered, _ = generate_recording(varied_model, batch2, PDrop(positions="renumbered"))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(original.logits, renumbered.logits))
    prompt = batch2["input_ids"].shape[1]
    for row in range(2):
        alone = row_alone(batch2, row)
        out, _ = generate_recording(varied_model, alone, PDrop(positions="renumbered"))
        assert out.sequences[0, alone["input_ids"].shape[1]:].tolist() == renumbered.sequences[row, prompt:].tolist()
        for got, expected in zip(out.logits, renumbered.logits):
            torch.testing.assert_close(got[0], expected[row], atol=1e-4, rtol=0)


def test_renumbered_positions_number_real_entries_and_leave_padding():
    positions = torch.tensor([[0, 0, 3, 7, 9], [2, 5, 6, 8, 11]])
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    assert renumbered_positions(positions, valid).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="valid"):
        renumbered_positions(positions, valid.long())


def test_positions_setting_loads_round_trips_and_is_validated(tmp_path):
    method = load_method("pdrop", positions="renumbered")
    assert method == PDrop(positions="renumbered") and method.moves_positions
    assert method_from_dict(method.to_dict()) == method
    method.to_yaml(tmp_path / "pdrop.yaml")
    assert "positions: renumbered" in (tmp_path / "pdrop.yaml").read_text()
    assert load_method(tmp_path / "pdrop.yaml") == method
    assert not PDrop().moves_positions
    with pytest.raises(ValueError, match=r"PDrop.positions = 'compact': must be one of \('original', 'renumbered'\)"):
        PDrop(positions="compact")
