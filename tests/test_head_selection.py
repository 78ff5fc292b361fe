"""Head selection for FastV + FinePruner: every strategy and every dynamic step against plain-Python arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rcpp_hf.methods.head_selection import (
    HEAD_STRATEGIES,
    HeadSelection,
    aggregate_heads,
    aggregation_weights,
    attention_complexity,
    complexity_head_count,
    consensus_diversity_heads,
    consensus_heads,
    consensus_threshold,
    diversity_heads,
    gap_based_count,
    head_scores,
    select_top_heads,
    strategy_consistency,
    strategy_quality,
    strategy_selection_count,
    weighted_votes,
)

# One query row's attention over 5 image tokens, 4 heads (rows sum to < 1: the rest went to text tokens).
ROWS = [
    [0.10, 0.05, 0.05, 0.05, 0.05],  # spread, small peak
    [0.40, 0.02, 0.02, 0.02, 0.04],  # strong peak, largest total
    [0.01, 0.01, 0.30, 0.01, 0.02],  # peak elsewhere
    [0.04, 0.04, 0.04, 0.04, 0.04],  # flat
]
ATTENTION = torch.tensor([ROWS])  # (1, 4, 5)


# -- plain-Python references ---------------------------------------------------------------------------------------
def _mean(xs):
    return sum(xs) / len(xs)


def _var(xs):  # unbiased, as torch.var
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def _entropy(xs):
    return -sum(p * math.log(p + 1e-8) for p in _softmax(xs))


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _gini(xs):
    s, n = sorted(xs), len(xs)
    return 2 * sum((i + 1) * x for i, x in enumerate(s)) / (n * sum(s)) - (n + 1) / n


def _reference_scores(strategy, rows=ROWS):
    if strategy == "entropy":
        entropies = [_entropy(r) for r in rows]
        return [-abs(e - _mean(entropies)) for e in entropies]
    k = max(1, min(64, len(rows[0]) // 4))
    per_row = {
        "sum": sum,
        "variance": _var,
        "max_attention": max,
        "attention_range": lambda r: max(r) - min(r),
        "sparsity": lambda r: sum(p * p for p in _softmax(r)),
        "top_k_sum": lambda r: sum(sorted(r, reverse=True)[:k]),
        "weighted_quality": lambda r: max(r) * _var(r),
        "gini": _gini,
    }[strategy]
    return [per_row(r) for r in rows]


def _reference_dynamic(rows, strategies=HEAD_STRATEGIES, base=1 / 3):
    """The design's five steps (LLaVA-FinePruner-Head's `.claude/CLAUDE.md`) with our documented choices, in plain
    Python: (chosen heads, weight per head)."""
    heads = len(rows)

    def best(key, k):  # k best heads, ties to the lowest index
        return sorted(range(heads), key=lambda h: (-key[h], h))[:k]

    intensity = [sum(r) for r in rows]
    quality, voted = [], []
    for strategy in strategies:  # step 1
        scores = _reference_scores(strategy, rows)
        balance = 1 - min(1.0, max(0.0, (max(scores) - min(scores)) / (_mean(scores) + 1e-8)))
        q = 0.4 * math.sqrt(_var(scores)) + 0.3 * balance + 0.3 * abs(_cos(scores, intensity))
        count = max(1, int(heads * 0.3)) if q > 0.7 else max(1, heads // 2) if q > 0.4 else max(1, int(heads * 0.65))
        quality.append(q)
        voted.append(set(best(scores, count)))
    pairs = [(i, j) for i in range(len(voted)) for j in range(i + 1, len(voted))]  # step 2
    c = _mean([len(voted[i] & voted[j]) / len(voted[i] | voted[j]) for i, j in pairs])
    threshold = min(0.5, base * (1 + c)) if c > 0.6 else max(0.15, base * c * 2) if c < 0.2 else base
    votes = [sum(q for q, v in zip(quality, voted) if h in v) for h in range(heads)]
    others = [(i, j) for i in range(heads) for j in range(heads) if i != j]  # step 3
    complexity = (
        0.4 * (1 - _mean([_cos(rows[i], rows[j]) for i, j in others]))
        + 0.3 * _mean([_entropy(r) for r in rows]) / math.log(len(rows[0]))
        + 0.3 * min(1.0, _mean([_var(r) for r in rows]) / (_mean([x for r in rows for x in r]) + 1e-8))
    )
    ordered = sorted(votes, reverse=True)
    gaps = [a - b for a, b in zip(ordered, ordered[1:])]
    cut = _mean(gaps) + 0.5 * math.sqrt(_var(gaps)) if len(gaps) >= 2 else math.inf
    gap_based = next((i + 1 for i, g in enumerate(gaps) if g > cut), max(1, heads // 4))
    if complexity > 0.7:
        target = int(gap_based * (1.2 + 0.3 * complexity))
    elif complexity < 0.3:
        target = int(gap_based * (0.7 + 0.6 * complexity))
    else:
        target = gap_based
    target = max(1, min(target, heads))
    candidates = [h for h in range(heads) if votes[h] >= threshold * sum(quality)]  # step 4
    consensus = sorted(candidates, key=lambda h: (-votes[h], h))[:target]
    diverse = []
    for _ in range(target - len(consensus)):
        free = [h for h in range(heads) if h not in consensus and h not in diverse]
        d_c = {h: 1 - _mean([_cos(rows[h], rows[o]) for o in consensus]) if consensus else 0.0 for h in free}
        if not diverse:
            key = d_c if consensus else {h: intensity[h] for h in free}
        else:
            key = {h: 0.6 * d_c[h] + 0.4 * (1 - _mean([_cos(rows[h], rows[o]) for o in diverse])) for h in free}
        diverse.append(max(free, key=lambda h: (key[h], -h)))
    logits = {}  # step 5
    for h in consensus:
        logits[h] = 1 + 0.5 * _mean([q for q, v in zip(quality, voted) if h in v])
    for h in diverse:
        logits[h] = 0.8 + 0.4 * intensity[h] / (max(intensity) + 1e-8)
    total = sum(math.exp(x) for x in logits.values())
    return sorted(logits), [math.exp(logits[h]) / total if h in logits else 0.0 for h in range(heads)]


# -- the nine fixed strategies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", HEAD_STRATEGIES)
def test_strategy_matches_hand_computation(strategy):
    scores = head_scores(ATTENTION, strategy)
    assert scores.shape == (1, 4) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0], torch.tensor(_reference_scores(strategy)), rtol=1e-5, atol=1e-6)


def test_hand_values_of_a_few_strategies():
    # Numbers worked out by hand on ROWS, independent of the reference helpers above.
    torch.testing.assert_close(head_scores(ATTENTION, "sum")[0], torch.tensor([0.30, 0.50, 0.35, 0.20]))
    torch.testing.assert_close(head_scores(ATTENTION, "attention_range")[0], torch.tensor([0.05, 0.38, 0.29, 0.0]))
    # head 0: mean 0.06, squared deviations 0.0016 + 4 * 0.0001 = 0.002, / 4 = 0.0005
    assert head_scores(ATTENTION, "variance")[0, 0].item() == pytest.approx(0.0005, rel=1e-5)
    # head 0 sorted [.05 .05 .05 .05 .10]: 2 (.05 (1+2+3+4) + .1 * 5) / (5 * .3) - 6 / 5 = 2 / 1.5 - 1.2 = 2 / 15
    assert head_scores(ATTENTION, "gini")[0, 0].item() == pytest.approx(2 / 15, rel=1e-5)
    assert head_scores(ATTENTION, "gini")[0, 3].item() == pytest.approx(0.0, abs=1e-6)  # flat head: no inequality


def test_top_k_sum_uses_a_quarter_of_the_tokens():
    row = torch.tensor([[[0.1, 0.5, 0.2, 0.3, 0.05, 0.0, 0.4, 0.25]]])  # 8 tokens -> k = 2
    assert head_scores(row, "top_k_sum").item() == pytest.approx(0.9)
    assert head_scores(row[..., :3], "top_k_sum").item() == pytest.approx(0.5)  # k >= 1 below 4 tokens


def test_entropy_favours_the_head_nearest_the_mean_entropy():
    entropies = [_entropy(r) for r in ROWS]
    nearest = min(range(4), key=lambda h: abs(entropies[h] - _mean(entropies)))
    assert head_scores(ATTENTION, "entropy")[0].argmax().item() == nearest


# -- top-H selection -------------------------------------------------------------------------------------------------
def test_select_top_heads_softmax_weights_and_aggregation():
    selection = select_top_heads(ATTENTION, "sum", num_heads=2)  # sums .30 .50 .35 .20 -> heads 1 and 2
    w1 = math.exp(0.50) / (math.exp(0.50) + math.exp(0.35))
    torch.testing.assert_close(selection.weights[0], torch.tensor([0.0, w1, 1 - w1, 0.0]))
    assert selection.num_selected.tolist() == [2]
    expected = [w1 * ROWS[1][v] + (1 - w1) * ROWS[2][v] for v in range(5)]
    torch.testing.assert_close(aggregate_heads(ATTENTION, selection)[0], torch.tensor(expected))


def test_all_heads_with_equal_scores_is_a_plain_mean():
    flat = torch.full((2, 4, 6), 0.1)
    selection = select_top_heads(flat, "max_attention", num_heads=4)
    torch.testing.assert_close(selection.weights, torch.full((2, 4), 0.25))
    torch.testing.assert_close(aggregate_heads(flat, selection), torch.full((2, 6), 0.1))


def test_ties_go_to_the_lowest_head_index():
    tied = torch.tensor([[[0.2, 0.1], [0.3, 0.0], [0.2, 0.1], [0.15, 0.15]]])  # sums .3 .3 .3 .3
    assert select_top_heads(tied, "sum", 2).selected[0].tolist() == [True, True, False, False]
    assert select_top_heads(tied, "attention_range", 1).selected[0].tolist() == [False, True, False, False]


def test_low_precision_input_is_scored_in_float32():
    half = ATTENTION.to(torch.bfloat16)
    for strategy in HEAD_STRATEGIES:
        scores = head_scores(half, strategy)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, head_scores(half.float(), strategy), rtol=0, atol=0)
    assert select_top_heads(half, "sum", 2).weights.dtype == torch.float32
    dynamic = consensus_diversity_heads(half)
    assert dynamic.weights.dtype == torch.float32
    assert torch.equal(dynamic.weights, consensus_diversity_heads(half.float()).weights)


# -- dynamic selection, step 1: strategy quality ----------------------------------------------------------------------
def test_strategy_quality_hand_case():
    scores = [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.6, 0.4]]
    attention = torch.tensor([[[0.1, 0.1], [0.3, 0.1], [0.2, 0.4], [0.4, 0.4]]])  # head sums .2 .4 .6 .8
    intensity = [0.2, 0.4, 0.6, 0.8]
    # strategy 0: std sqrt(5/3); range 3 / mean 2.5 -> balance 0; scores parallel to intensity -> correlation 1
    q0 = 0.4 * math.sqrt(5 / 3) + 0.3 * 0.0 + 0.3 * 1.0
    # strategy 1: std sqrt(.02 / 3); range .2 / mean .5 -> balance .6
    q1 = 0.4 * math.sqrt(0.02 / 3) + 0.3 * 0.6 + 0.3 * _cos(scores[1], intensity)
    torch.testing.assert_close(strategy_quality(torch.tensor([scores]), attention), torch.tensor([[q0, q1]]))


def test_strategy_quality_balance_is_one_for_nonpositive_mean():
    # entropy-like scores are <= 0: range / mean < 0 is clamped to 0, balance 1
    scores = torch.tensor([[[-0.3, -0.1, -0.2]]])
    attention = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # head sums 1 1 2
    q = 0.4 * 0.1 + 0.3 * 1.0 + 0.3 * abs(_cos([-0.3, -0.1, -0.2], [1, 1, 2]))
    assert strategy_quality(scores, attention).item() == pytest.approx(q, rel=1e-5)


def test_strategy_selection_count_follows_the_note():
    quality = torch.tensor([0.71, 0.70, 0.41, 0.40, 0.0])
    assert strategy_selection_count(quality, 10).tolist() == [3, 5, 5, 6, 6]
    assert strategy_selection_count(quality, 32).tolist() == [9, 16, 16, 20, 20]
    assert strategy_selection_count(quality, 2).tolist() == [1, 1, 1, 1, 1]  # int(0.6) = 0 -> at least 1


# -- step 2: consistency, threshold, votes ---------------------------------------------------------------------------
VOTES = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]]], dtype=torch.bool)  # {0,1}, {1,2}, {0,1,2,3}


def test_strategy_consistency_is_mean_pairwise_jaccard():
    # J({0,1},{1,2}) = 1/3, J({0,1},all) = 2/4, J({1,2},all) = 2/4
    assert strategy_consistency(VOTES).item() == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)
    identical = VOTES[:, :1].expand(1, 3, 4)
    assert strategy_consistency(identical).item() == pytest.approx(1.0)


def test_consensus_threshold_regimes():
    c = torch.tensor([0.9, 0.61, 0.6, 0.4, 0.2, 0.1])
    third = 1 / 3
    expected = [0.5, 0.5, third, third, third, 0.15]  # 1/3 * 1.61 > .5; 2/3 * .1 < .15
    torch.testing.assert_close(consensus_threshold(c), torch.tensor(expected))
    torch.testing.assert_close(consensus_threshold(torch.tensor([0.7]), 0.25), torch.tensor([0.425]))
    torch.testing.assert_close(consensus_threshold(torch.tensor([0.19]), 0.5), torch.tensor([0.19]))


def test_weighted_votes_sum_the_voters_quality():
    quality = torch.tensor([[0.5, 0.2, 1.0]])
    torch.testing.assert_close(weighted_votes(VOTES, quality), torch.tensor([[1.5, 1.7, 1.2, 1.0]]))


# -- step 3: complexity-aware head count -----------------------------------------------------------------------------
def test_attention_complexity_hand_case():
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    diversity = 1 - _mean([_cos(ROWS[i], ROWS[j]) for i, j in pairs])
    entropy = _mean([_entropy(r) for r in ROWS]) / math.log(5)
    variance = min(1.0, _mean([_var(r) for r in ROWS]) / _mean([x for r in ROWS for x in r]))
    expected = 0.4 * diversity + 0.3 * entropy + 0.3 * variance
    assert attention_complexity(ATTENTION).item() == pytest.approx(expected, rel=1e-5)


def test_gap_based_count_finds_the_first_clear_drop():
    votes = torch.tensor([[0.9, 3.0, 0.7, 2.9, 1.0, 0.8, 0.6, 0.5]])  # sorted: 3 2.9 | 1 .9 .8 .7 .6 .5
    # gaps .1 1.9 .1 .1 .1 .1 .1: mean .357, std .680 -> threshold .697; the first larger gap is the 2nd
    assert gap_based_count(votes).tolist() == [2]
    assert gap_based_count(torch.ones(1, 12)).tolist() == [3]  # no drop: H // 4
    assert gap_based_count(torch.tensor([[1.0, 0.0, 0.0]])).tolist() == [1]  # gaps 1, 0: threshold .854
    assert gap_based_count(torch.tensor([[1.0, 0.0]])).tolist() == [1]  # one gap: fallback max(1, 2 // 4)


def test_complexity_head_count_regimes():
    gap = torch.tensor([10, 10, 10, 10, 30, 1])
    complexity = torch.tensor([0.8, 0.2, 0.5, 0.7, 0.9, 0.0])
    # int(10 * 1.44) = 14; int(10 * .82) = 8; 10; 10 (0.7 is not > 0.7); int(30 * 1.47) = 44 -> 32; int(.7) = 0 -> 1
    assert complexity_head_count(gap, complexity, heads=32).tolist() == [14, 8, 10, 10, 32, 1]


# -- step 4: consensus then diversity --------------------------------------------------------------------------------
def test_consensus_heads_threshold_and_target():
    votes = torch.tensor([[1.5, 1.7, 1.2, 1.0]])
    threshold, total = torch.tensor([0.65]), torch.tensor([1.7])  # cut 1.105: heads 0, 1, 2
    assert consensus_heads(votes, threshold, total, torch.tensor([5]))[0].tolist() == [True, True, True, False]
    assert consensus_heads(votes, threshold, total, torch.tensor([2]))[0].tolist() == [True, True, False, False]
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert consensus_heads(tied, torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([2]))[0].tolist() == [
        True, True, False, False
    ]


# Five heads over 3 tokens; head 0 is the consensus.
DIVERSE = [
    [1.0, 0.0, 0.0],
    [0.0, 1.0, 0.0],  # orthogonal to head 0
    [0.0, 1.0, 0.2],  # orthogonal to head 0, nearly head 1
    [0.3, 0.0, 1.0],  # a little like head 0, orthogonal to head 1
    [1.0, 0.1, 0.0],  # nearly head 0
]


def test_diversity_heads_two_levels():
    attention = torch.tensor([DIVERSE, DIVERSE])
    consensus = torch.tensor([[True, False, False, False, False]] * 2)
    d_c = [1 - _cos(h, DIVERSE[0]) for h in DIVERSE]  # 0, 1, 1, .713, .005
    # first pick: max d_c, heads 1 and 2 tie -> head 1
    # second: 0.6 d_c + 0.4 (1 - cos to head 1): head 2 .6 + .4 * .019 = .608 < head 3 .428 + .4 = .828
    assert 0.6 * d_c[2] + 0.4 * (1 - _cos(DIVERSE[2], DIVERSE[1])) < 0.6 * d_c[3] + 0.4
    picked = diversity_heads(attention, consensus, torch.tensor([2, 0]))
    assert picked.tolist() == [[False, True, False, True, False], [False] * 5]  # pure d_c order would give 1, 2
    # third: mean similarity to heads 1 and 3; head 2 .766 beats head 4 .326
    picked = diversity_heads(attention[:1], consensus[:1], torch.tensor([3]))
    assert picked[0].tolist() == [False, True, True, True, False]


def test_diversity_heads_without_consensus_start_from_the_strongest_head():
    attention = torch.tensor([DIVERSE])  # sums 1 1 1.2 1.3 1.1 -> head 3 first
    none = torch.zeros(1, 5, dtype=torch.bool)
    # then 0.4 (1 - cos to head 3): head 1 (cos 0) beats head 2 (.188), head 4 (.286), head 0 (.287)
    assert diversity_heads(attention, none, torch.tensor([2]))[0].tolist() == [False, True, False, True, False]


# -- step 5: weights -------------------------------------------------------------------------------------------------
def test_aggregation_weights_hand_case():
    quality = torch.tensor([[0.5, 0.2, 1.0]])
    consensus = torch.tensor([[True, True, False, False]])
    diversity = torch.tensor([[False, False, False, True]])
    # head 0: voters 0, 2 -> mean quality .75; head 1: voters 0, 1, 2 -> 1.7 / 3; head 3: sum .2 / max sum .5
    logits = [1 + 0.5 * 0.75, 1 + 0.5 * 1.7 / 3, 0.8 + 0.4 * 0.2 / 0.5]
    exps = [math.exp(x) for x in logits]
    expected = [exps[0] / sum(exps), exps[1] / sum(exps), 0.0, exps[2] / sum(exps)]
    weights = aggregation_weights(ATTENTION, consensus, diversity, VOTES, quality)
    torch.testing.assert_close(weights, torch.tensor([expected]))


# -- the whole dynamic selection -------------------------------------------------------------------------------------
def _random_attention(batch, heads, visual, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, visual, generator=generator) * 3
    return torch.softmax(logits, dim=-1) * torch.rand(batch, heads, 1, generator=generator)


@pytest.mark.parametrize("seed", [None, 0, 1, 2, 3])
def test_consensus_diversity_heads_matches_a_plain_python_reference(seed):
    attention = ATTENTION if seed is None else _random_attention(1, 7, 9, seed)
    rows = attention[0].tolist()
    chosen, weights = _reference_dynamic(rows)
    selection = consensus_diversity_heads(attention)
    assert isinstance(selection, HeadSelection)
    assert torch.nonzero(selection.selected[0]).flatten().tolist() == chosen
    assert selection.num_selected.tolist() == [len(chosen)]
    torch.testing.assert_close(selection.weights[0], torch.tensor(weights), rtol=1e-5, atol=1e-6)


def test_rows_of_a_batch_are_independent():
    attention = _random_attention(3, 8, 24, seed=0)
    batched = [select_top_heads(attention, s, 3) for s in HEAD_STRATEGIES] + [consensus_diversity_heads(attention)]
    for b in range(3):
        alone = [select_top_heads(attention[b : b + 1], s, 3) for s in HEAD_STRATEGIES]
        alone.append(consensus_diversity_heads(attention[b : b + 1]))
        for together, single in zip(batched, alone):
            assert torch.equal(together.selected[b : b + 1], single.selected)
            assert together.num_selected[b] == single.num_selected[0]
            torch.testing.assert_close(together.weights[b : b + 1], single.weights, rtol=1e-6, atol=1e-7)


def test_dynamic_selection_is_deterministic_and_valid_on_llava_shapes():
    attention = _random_attention(2, 32, 576, seed=1)
    first, second = consensus_diversity_heads(attention), consensus_diversity_heads(attention)
    assert torch.equal(first.weights, second.weights)
    assert ((first.num_selected >= 1) & (first.num_selected <= 32)).all()
    assert torch.equal(first.selected.sum(-1), first.num_selected)
    torch.testing.assert_close(first.weights.sum(-1), torch.ones(2))
    assert aggregate_heads(attention, first).shape == (2, 576)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(ValueError, match="known strategies: sum, variance, entropy.*gini"):
        head_scores(ATTENTION, "gini_coefficient")
    with pytest.raises(ValueError, match="unknown head strategy"):
        consensus_diversity_heads(ATTENTION, strategies=("sum", "hierarchical"))


@pytest.mark.parametrize("num_heads", [0, 5, -1, True, 2.0])
def test_num_heads_out_of_range(num_heads):
    with pytest.raises(ValueError, match="num_heads"):
        select_top_heads(ATTENTION, "sum", num_heads)


@pytest.mark.parametrize(
    "attention, match",
    [
        (ATTENTION[0], "shape"),
        (torch.ones(1, 4, 5, dtype=torch.long), "floating-point"),
        (ATTENTION[..., :1], "at least 2 visual tokens"),
    ],
)
def test_bad_attention(attention, match):
    with pytest.raises(ValueError, match=match):
        head_scores(attention, "sum")


def test_bad_dynamic_settings():
    with pytest.raises(ValueError, match="at least 2 heads"):
        consensus_diversity_heads(ATTENTION[:, :1])
    with pytest.raises(ValueError, match="strategies"):
        consensus_diversity_heads(ATTENTION, strategies=("sum",))
    with pytest.raises(ValueError, match="strategies"):
        consensus_diversity_heads(ATTENTION, strategies=("sum", "sum"))
    with pytest.raises(ValueError, match="base_threshold"):
        consensus_diversity_heads(ATTENTION, base_threshold=0.0)


def test_aggregate_heads_checks_the_selection_shape():
    selection = select_top_heads(ATTENTION, "sum", 2)
    with pytest.raises(ValueError, match="selection.weights"):
        aggregate_heads(ATTENTION[:, :3], selection)
