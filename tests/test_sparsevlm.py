"""SparseVLM's scoring maths on hand-made tensors: text raters, rater scores, keep lists and token recycling."""

from __future__ import annotations

import math

import pytest
import torch

from rcpp_hf.methods.sparsevlm import (
    SPARSEVLM_KEEP,
    SPARSEVLM_LAYERS,
    average_visual_tokens,
    density_peak_clusters,
    keep_top_scored,
    rater_scores,
    recycle_tokens,
    select_text_raters,
    sparsevlm_keep_counts,
)


def test_keep_lists_and_layers_match_the_repository():
    assert SPARSEVLM_LAYERS == (2, 6, 15)
    assert SPARSEVLM_KEEP[192] == (300, 200, 110)
    assert SPARSEVLM_KEEP[128] == (303, 110, 36)
    assert SPARSEVLM_KEEP[64] == (66, 30, 17)
    assert sparsevlm_keep_counts(128 / 576) == (303, 110, 36)
    # 576 / 4 = 144 visual tokens: 303/4 = 75.75, 110/4 = 27.5 (a half: to even), 36/4 = 9; 66/4 = 16.5 (to even),
    # 17/4 = 4.25.
    assert sparsevlm_keep_counts(128 / 576, 144) == (76, 28, 9)
    assert sparsevlm_keep_counts(64 / 576, 144) == (16, 8, 4)
    assert sparsevlm_keep_counts(64 / 576, 8) == (1, 1, 1)


def test_average_visual_tokens_counts_what_each_layer_computes():
    # 4 layers, prune after layer 1 to 2 of 8: layers 0, 1 see 8, layers 2, 3 see 2.
    assert average_visual_tokens((2,), (1,), 4, 8) == 5.0
    # The repository's lists are above their nominal budgets: layers 0-2 see 576, 3-6 the first count, and so on.
    by_hand = (3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32
    assert average_visual_tokens(SPARSEVLM_KEEP[192], SPARSEVLM_LAYERS, 32, 576) == by_hand
    assert average_visual_tokens(SPARSEVLM_KEEP[192], SPARSEVLM_LAYERS, 32, 576) == 202.75
    assert average_visual_tokens(SPARSEVLM_KEEP[128], SPARSEVLM_LAYERS, 32, 576) == 140.8125
    assert average_visual_tokens(SPARSEVLM_KEEP[64], SPARSEVLM_LAYERS, 32, 576) == 79.1875


def raters_by_hand(visual, text):
    """Plain loops: relevance[t] = mean_v softmax_t(v . t); raters: relevance > mean relevance."""
    relevance = [0.0] * len(text)
    for v in visual:
        logits = [sum(a * b for a, b in zip(v, t)) for t in text]
        total = sum(math.exp(x) for x in logits)
        for index, x in enumerate(logits):
            relevance[index] += math.exp(x) / total / len(visual)
    mean = sum(relevance) / len(relevance)
    return [r > mean for r in relevance]


def test_raters_by_hand():
    visual = [[1.0, 0.0], [0.0, 1.0]]
    text = [[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    # relevance = ((e^2/(e^2+2) + 1/(2+e)), (1/(e^2+2) + 1/(2+e)), (1/(e^2+2) + e/(2+e))) / 2 = (0.50, 0.16, 0.34)
    assert raters_by_hand(visual, text) == [True, False, True]
    raters = select_text_raters(torch.tensor([visual]), torch.tensor([text]), torch.ones(1, 3, dtype=torch.bool))
    assert raters.tolist() == [[True, False, True]]


def test_raters_ignore_padding_and_rows_are_independent():
    generator = torch.Generator().manual_seed(0)
    visual = torch.randn(2, 6, 8, generator=generator)
    text = torch.randn(2, 7, 8, generator=generator)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # row 1 has 3 padding entries (garbage states)
    text[1, :3] = 100.0
    raters = select_text_raters(visual, text, valid)
    assert raters[0].tolist() == raters_by_hand(visual[0].tolist(), text[0].tolist())
    assert raters[1, :3].tolist() == [False] * 3
    assert raters[1, 3:].tolist() == raters_by_hand(visual[1].tolist(), text[1, 3:].tolist())
    alone = select_text_raters(visual[1:], text[1:, 3:], torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(raters[1:, 3:], alone)


def test_a_row_without_a_token_above_the_mean_rates_with_every_valid_token():
    raters = select_text_raters(torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.tensor([[False, True]]))
    assert raters.tolist() == [[False, True]]


def test_rater_scores_by_hand():
    generator = torch.Generator().manual_seed(1)
    attention = torch.rand(2, 3, 4, 5, generator=generator)
    raters = torch.tensor([[True, False, True, False], [False, False, False, True]])
    scores = rater_scores(attention, raters)
    for b in range(2):
        rows = [t for t in range(4) if raters[b, t]]
        for v in range(5):
            expected = sum(attention[b, h, t, v].item() for h in range(3) for t in rows) / (3 * len(rows))
            assert scores[b, v].item() == pytest.approx(expected, abs=1e-6)


def test_keep_top_scored():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [0.4, 0.2, 0.8, 0.0]])
    assert keep_top_scored(scores, 2).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert keep_top_scored(scores, 4).all()


def dpc_by_hand(features, num_clusters):
    """Plain-loop density peaks clustering, ties to the lower index: (centres in score order, assignment)."""
    n, dim = len(features), len(features[0])
    dist = [[math.dist(a, b) / math.sqrt(dim) for b in features] for a in features]
    density = [math.exp(-sum(d * d for d in sorted(row)[:num_clusters]) / num_clusters) for row in dist]
    farthest = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min((dist[i][j] for j in denser), default=farthest))
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:num_clusters]
    assignment = [min(range(num_clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(n)]
    for c, i in enumerate(centres):
        assignment[i] = c
    return centres, assignment


@pytest.mark.parametrize("seed", range(4))
def test_density_peak_clusters_equals_plain_loops(seed):
    features = torch.randn(1, 23, 5, generator=torch.Generator().manual_seed(seed))
    centres, assignment = density_peak_clusters(features, 3)
    expected_centres, expected_assignment = dpc_by_hand(features[0].tolist(), 3)
    assert centres[0].tolist() == expected_centres
    assert assignment[0].tolist() == expected_assignment


def two_groups(offset: float = 0.0):
    """26 visual tokens: 0-1 kept (best scores); 2-6 near A, 7-11 near B (the 10 best deleted); 12-25 far away."""
    generator = torch.Generator().manual_seed(int(offset))
    hidden = torch.full((26, 4), 100.0)
    hidden[:2] = 1000.0
    hidden[2:7] = offset + 0.1 * torch.randn(5, 4, generator=generator)
    hidden[7:12] = offset + 5.0 + 0.1 * torch.randn(5, 4, generator=generator)
    scores = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(5.0, 4.0, 10), torch.linspace(1.0, 0.0, 14)])
    keep = torch.zeros(26, dtype=torch.bool)
    keep[:2] = True
    return hidden, scores, keep


def test_recycling_merges_two_hand_made_groups():
    hidden, scores, keep = two_groups()
    # 24 deleted -> int(24 * 0.4) + 1 = 10 recycled (tokens 2-11) -> 10 // 10 + 1 = 2 clusters.
    merged, representative = recycle_tokens(hidden[None], scores[None], keep[None], ratio=0.4)
    assert merged.shape == (1, 2, 4)
    assert 2 <= representative[0, 0] <= 6 and 7 <= representative[0, 1] <= 11
    torch.testing.assert_close(merged[0, 0], hidden[2:7].mean(dim=0))
    torch.testing.assert_close(merged[0, 1], hidden[7:12].mean(dim=0))


def test_recycling_default_ratio_merges_the_best_deleted_into_one_token():
    hidden, scores, keep = two_groups()
    # 24 deleted -> int(24 * 0.3) + 1 = 8 recycled (tokens 2-9) -> 1 cluster: their mean.
    merged, representative = recycle_tokens(hidden[None], scores[None], keep[None])
    torch.testing.assert_close(merged[0], hidden[2:10].mean(dim=0, keepdim=True))
    assert 2 <= representative.item() <= 9


def test_recycling_rows_are_independent_and_every_ratio_is_capped():
    rows = [two_groups(0.0), two_groups(3.0)]
    hidden, scores, keep = (torch.stack(parts) for parts in zip(*rows))
    merged, representative = recycle_tokens(hidden, scores, keep, ratio=0.4)
    for b in range(2):
        alone = recycle_tokens(hidden[b : b + 1], scores[b : b + 1], keep[b : b + 1], ratio=0.4)
        torch.testing.assert_close(merged[b : b + 1], alone[0])
        assert torch.equal(representative[b : b + 1], alone[1])
    merged, representative = recycle_tokens(hidden, scores, keep, ratio=1.0)  # all 24 -> 3 clusters
    assert merged.shape == (2, 3, 4) and representative.shape == (2, 3)


def test_nothing_deleted_nothing_recycled():
    hidden, scores, _ = two_groups()
    merged, representative = recycle_tokens(hidden[None], scores[None], torch.ones(1, 26, dtype=torch.bool))
    assert merged.shape == (1, 0, 4) and representative.shape == (1, 0)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="share"):
        sparsevlm_keep_counts(1.5)
    with pytest.raises(ValueError, match="text_valid"):
        select_text_raters(torch.randn(1, 3, 4), torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_hidden"):
        select_text_raters(torch.randn(1, 3, 4), torch.randn(1, 2, 5), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="raters"):
        rater_scores(torch.rand(1, 2, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep"):
        keep_top_scored(torch.rand(1, 4), 5)
    with pytest.raises(ValueError, match="keep"):
        keep_top_scored(torch.rand(1, 4), 0)
    hidden, scores, keep = two_groups()
    uneven = torch.stack([keep, torch.ones_like(keep)])
    with pytest.raises(ValueError, match="keep"):
        recycle_tokens(torch.stack([hidden, hidden]), torch.stack([scores, scores]), uneven)
    with pytest.raises(ValueError, match="ratio"):
        recycle_tokens(hidden[None], scores[None], keep[None], ratio=0.0)
    with pytest.raises(ValueError, match="layers"):
        average_visual_tokens((300, 200, 110), (2, 6, 32), 32, 576)
