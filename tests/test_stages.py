"""Each stage against hand-computed values, and the recorded quantities against transformers' own."""

import math

import pytest
import torch

from rcpp_hf.rcpp.schedule import (
    schedule_progress,
    scheduled_value,
    visual_token_budget,
)
from rcpp_hf.rcpp.stages import (
    accumulate_consistency,
    adaptive_plausibility,
    drcd_fuse,
    group_visual_tokens,
    grouping_threshold,
    instant_consistency,
    reasoning_state,
    reconstruct_visual_tokens,
    select_evictions,
)
from rcpp_hf.rcpp.visual_states import VisualStates


def test_reasoning_state_takes_the_requested_row():
    hidden = torch.arange(12.0).view(1, 3, 4)
    assert torch.equal(reasoning_state(hidden, row=-1), torch.tensor([[8.0, 9.0, 10.0, 11.0]]))
    assert torch.equal(reasoning_state(hidden, row=0), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def literal_reconstruction(alpha, states):
    """recon_i = sum_l alpha[t, i, l] * v_i[l], written out as the RCPP + DRCD method states it.  -> (B, Vc, D)"""
    batch, num_visual, num_layers, _ = states.shape
    return torch.stack([
        torch.stack([sum(alpha[b, l, i] * states[b, i, l] for l in range(num_layers)) for i in range(num_visual)])
        for b in range(batch)
    ])


def test_reconstruction_by_hand():
    alpha = torch.tensor([[[0.5, 0.1], [0.2, 0.3]]])  # (B=1, Ls=2, Vc=2)
    # layer 0: token 0 (1, 0), token 1 (0, 1); layer 1: token 0 (2, 2), token 1 (4, 0)
    states = VisualStates.from_layers([torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[2.0, 2.0], [4.0, 0.0]]])])
    h = torch.tensor([[1.0, 0.0]])
    recon = torch.tensor([[[0.5 * 1 + 0.2 * 2, 0.2 * 2], [0.3 * 4, 0.1 * 1]]])  # (0.9, 0.4), (1.2, 0.1)
    torch.testing.assert_close(literal_reconstruction(alpha, states.states), recon)
    projection, norm = reconstruct_visual_tokens(alpha, states.states, states.gram, h)
    torch.testing.assert_close(projection, torch.tensor([[0.9, 1.2]]))
    torch.testing.assert_close(norm, recon.norm(dim=-1))


def test_factored_reconstruction_equals_the_literal_one():
    generator = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 3, 5, generator=generator)
    states = VisualStates.from_layers([torch.randn(2, 5, 8, generator=generator) for _ in range(3)])
    h = torch.randn(2, 8, generator=generator)
    recon = literal_reconstruction(alpha, states.states)
    projection, norm = reconstruct_visual_tokens(alpha, states.states, states.gram, h)
    expected = torch.nn.functional.cosine_similarity(recon, h[:, None, :], dim=-1)
    torch.testing.assert_close(instant_consistency(projection, norm, h), expected)
    kept = states.keep(torch.tensor([[4, 0], [1, 2]]))
    torch.testing.assert_close(kept.states[1, 0], states.states[1, 1])
    torch.testing.assert_close(kept.gram[0, 0], states.gram[0, 4])


def test_instant_consistency_is_a_clamped_cosine():
    h = torch.tensor([[1.0, 0.0]])
    recon = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [1.0 + 1e-7, 0.0]]])
    projection, norm = recon @ h[0], recon.norm(dim=-1)
    expected = torch.tensor([[1.0, 0.0, -1.0, 1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(instant_consistency(projection, norm, h), expected)
    assert instant_consistency(projection * 1.01, norm, h).max() == 1.0


def test_ema_initialises_then_accumulates():
    first = torch.tensor([[1.0, 0.0]])
    assert torch.equal(accumulate_consistency(None, first, gamma=0.9), first)
    updated = accumulate_consistency(first, torch.tensor([[0.0, 1.0]]), gamma=0.75)
    torch.testing.assert_close(updated, torch.tensor([[0.75, 0.25]]))


def test_grouping_threshold_is_inclusive():
    assert group_visual_tokens(torch.tensor([[0.2, 0.5, 0.7]]), tau=0.5).tolist() == [[False, True, True]]


NAN = float("nan")
# Two rows with different scales; ties (0.4, 0.4 and 0.5, 0.5); row 0's last token evicted or masked out (NaN).
HAND_S = torch.tensor([[0.1, 0.4, 0.4, 0.2, NAN], [0.9, -0.3, 0.5, 0.5, 0.7]])


def test_absolute_tau_is_unchanged():
    assert grouping_threshold(HAND_S, 0.3, "absolute") == 0.3
    assert torch.equal(group_visual_tokens(HAND_S, 0.3, "absolute"), HAND_S >= 0.3)
    assert torch.equal(group_visual_tokens(HAND_S, 0.3), HAND_S >= 0.3)


@pytest.mark.parametrize(
    "tau, thresholds, core",
    [
        # row 0 sorted (NaN left out): 0.1 0.2 0.4 0.4, n = 4; row 1: -0.3 0.5 0.5 0.7 0.9, n = 5; k = floor(tau (n - 1))
        (0.5, [0.2, 0.5], [[0, 1, 1, 1, 0], [1, 0, 1, 1, 1]]),  # k = 1, 2: row 1's tie at the threshold is in C
        (0.75, [0.4, 0.7], [[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]]),  # k = 2, 3: both 0.4 stay in C
        (0.0, [0.1, -0.3], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),  # the minimum: N empty
        (1.0, [0.4, 0.9], [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]),  # the maximum: its ties only
    ],
)
def test_quantile_tau_by_hand(tau, thresholds, core):
    torch.testing.assert_close(grouping_threshold(HAND_S, tau, "quantile"), torch.tensor(thresholds)[:, None])
    assert group_visual_tokens(HAND_S, tau, "quantile").int().tolist() == core


def test_std_tau_by_hand():
    # row 0: mean 1.1 / 4 = 0.275, variance 0.0675 / 4; row 1: mean 2.3 / 5 = 0.46, variance 0.832 / 5
    expected = torch.tensor([[0.275 - math.sqrt(0.0675 / 4)], [0.46 - math.sqrt(0.832 / 5)]])  # 0.1451, 0.0521
    torch.testing.assert_close(grouping_threshold(HAND_S, 1.0, "std"), expected)
    assert group_visual_tokens(HAND_S, 1.0, "std").int().tolist() == [[0, 1, 1, 1, 0], [1, 0, 1, 1, 1]]
    torch.testing.assert_close(grouping_threshold(HAND_S, 0.0, "std"), torch.tensor([[0.275], [0.46]]))


def test_unknown_tau_mode_is_refused():
    with pytest.raises(ValueError, match="tau_mode"):
        grouping_threshold(HAND_S, 0.5, "median")


def test_evictions_pick_the_lowest_scores_per_row():
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.2], [0.0, 0.5, -0.4, 0.6]])
    picked = select_evictions(scores, 2)
    assert [set(row) for row in picked.tolist()] == [{1, 3}, {0, 2}]


def test_drcd_fusion_per_row_lambda():
    core = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    noise = torch.tensor([[1.0, 3.0], [5.0, 5.0]])
    fused = drcd_fuse(core, noise, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(fused, torch.tensor([[1.5, -0.5], [1.0, 1.0]]))


def test_plausibility_keeps_tokens_within_beta_of_the_best():
    core = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    final = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = adaptive_plausibility(final, core, beta=0.4)  # threshold 0.24: keeps 0.6 and 0.3
    assert out[0, :2].tolist() == [1.0, 2.0] and torch.isinf(out[0, 2:]).all()


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("linear", 0, 0.0), ("linear", 5, 0.5), ("linear", 10, 1.0), ("linear", 99, 1.0),
        ("cosine", 0, 0.0), ("cosine", 5, 0.5), ("cosine", 10, 1.0), ("cosine", 2, (1 - math.cos(math.pi * 0.2)) / 2),
        ("step", 0, 0.0), ("step", 5, 0.0), ("step", 9, 0.0), ("step", 10, 1.0),
    ],
)
def test_schedule_ends_and_midpoints(schedule, step, expected):
    assert schedule_progress(step, 10, schedule) == pytest.approx(expected)
    assert scheduled_value(1.0, 0.25, step, 10, schedule) == pytest.approx(1.0 - 0.75 * expected)


def test_budget_rounds_up_and_keeps_at_least_one():
    assert visual_token_budget(1.0, 576) == 576
    assert visual_token_budget(0.25, 576) == 144
    assert visual_token_budget(0.25, 10) == 3
    assert visual_token_budget(0.001, 10) == 1


def prefill_with_rcpp_tap(model, batch, layers):
    """The prompt's forward through `run_decoder` with an `RCPPTap` on `layers`; returns the tap and the output."""
    from rcpp_hf.engine.cache import VisualKVCache
    from rcpp_hf.engine.decoder import run_decoder
    from rcpp_hf.engine.layout import TokenLayout
    from rcpp_hf.rcpp.tap import RCPPTap

    valid = batch["attention_mask"].bool()
    layout = TokenLayout.prompt(
        (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0), valid, batch["input_ids"] == model.config.image_token_id
    )
    tap = RCPPTap(sorted(layers))
    with torch.no_grad():
        embeds = model.family.embed_prompt(batch["input_ids"], {"pixel_values": batch["pixel_values"]})
        hidden, _ = run_decoder(model.model.language_model, embeds, layout, VisualKVCache(config=model.config), [tap])
    return tap, hidden


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_recorded_attention_matches_eager_attention(tiny_path, batch2, implementation):
    """alpha comes from the recorded query rows, whatever the implementation; it must equal eager's attentions."""
    from transformers import LlavaForConditionalGeneration

    from rcpp_hf import RCPPLlavaForConditionalGeneration

    eager = LlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation="eager").eval()
    model = RCPPLlavaForConditionalGeneration.from_pretrained(tiny_path, attn_implementation=implementation).eval()
    tap, hidden = prefill_with_rcpp_tap(model, batch2, {2, 3})
    with torch.no_grad():
        reference = eager(**batch2, output_attentions=True, output_hidden_states=True)
    for layer in (2, 3):
        expected = reference.attentions[layer][:, :, -1, :].mean(dim=1)  # (B, K) head-averaged, last row
        torch.testing.assert_close(tap.probs[layer], expected, atol=1e-6, rtol=0)
    # h_t is what hidden_states[-1][:, -1, :] holds.
    torch.testing.assert_close(reasoning_state(hidden, -1), reference.hidden_states[-1][:, -1, :])


def test_captured_visual_states_are_the_layer_outputs(rcpp_model, batch2):
    image_mask = batch2["input_ids"] == rcpp_model.config.image_token_id
    tap, _ = prefill_with_rcpp_tap(rcpp_model, batch2, {1, 3})
    captured = tap.captured_states(torch.arange(16).expand(2, -1))
    with torch.no_grad():
        reference = rcpp_model(**batch2, output_hidden_states=True)
    # hidden_states = (embeddings, layer 0, 1, 2, final norm of layer 3)
    torch.testing.assert_close(captured[0], reference.hidden_states[2][image_mask].view(2, 16, -1))
    with torch.no_grad():
        last = rcpp_model.model.language_model.norm(captured[1])
    torch.testing.assert_close(last, reference.hidden_states[4][image_mask].view(2, 16, -1))
