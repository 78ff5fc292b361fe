"""Attention-head selection for FastV + FinePruner: which heads' attention decides the kept image tokens.

Input everywhere: `attention` (batch, heads, visual), one query row's attention probabilities (softmax over the whole
sequence) sliced to the image tokens, per head. It is NOT renormalised over the image: the repository scores the raw
slice. Where the repository wants a distribution (the entropy and sparsity strategies, and the entropy term of the
complexity step) it applies `softmax` to that slice, i.e. a softmax of probabilities, and so do we, as written.
All maths is float32 whatever the input dtype; batch rows are independent; ties go to the lowest head index.

Sources (the repository is EasonAI-5589/LLaVA-FinePruner-Head, "the repository" below; "the design" is its
`.claude/CLAUDE.md`, section "核心算法：Intelligent Consensus-Diversity Selection", steps 1-5):

    score_sum ... score_gini        llava/model/language_model/modeling_llama_fastv_fine_head.py,
                                    `select_heads_by_strategy` (one branch each; "gini" is its "gini_coefficient")
    head_scores                     dispatch over the nine strategies above
    select_top_heads                same function: top-H by score, weights softmax(selected scores)
    aggregate_heads                 same function: weighted sum of the selected heads' rows
    consensus_diversity_heads       the design, steps 1-5, through the functions below
      strategy_quality              step 1 (modeling_llama_fastv_ablation_dynamic.py `evaluate_strategy_quality`)
      strategy_selection_count      step 1, the design's counts int(0.3 H) / H // 2 / int(0.65 H)
      strategy_consistency          step 2 (ablation_dynamic `compute_strategy_consistency`: mean pairwise Jaccard)
      consensus_threshold           step 2, the design's rule with base 1/3 (ablation_dynamic at commit 42b76b7)
      weighted_votes                step 2, quality-weighted votes
      attention_complexity          step 3 (ablation_dynamic `compute_attention_complexity`)
      gap_based_count               step 3's `gap_based` (ablation_dynamic `complexity_aware_head_count`)
      complexity_head_count         step 3, the design's complexity adjustment
      consensus_heads               step 4's consensus set (ablation_dynamic `consensus_diversity_selection`)
      diversity_heads               step 4, two-level diversity (ablation_dynamic `multi_level_diversity_selection`)
      aggregation_weights           step 5 (ablation_dynamic `compute_intelligent_weights`)

Caveat on the source: no commit of the repository imports modeling_llama_fastv_fine_head.py. Its head-strategy
ablation ran `--pruning_method ablation_a` (modeling_llama_fastv_ablation_a.py), which averages the top-H heads
with equal weights and defines three strategies differently: entropy keeps the lowest-entropy heads, top_k_sum uses
k = min(10, visual), weighted_quality is 0.4 max + 0.4 sum of squares + 0.2 / #(p > 0.01) on the softmaxed slice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The repository adds 1e-8 inside logs and denominators; kept so that values match its code.
_EPS = 1e-8


# -- inputs ------------------------------------------------------------------------------------------------------------
def _as_float32(attention: Tensor) -> Tensor:
    """Validates (batch, heads, visual) attention and returns it as float32."""
    if not isinstance(attention, Tensor) or not attention.is_floating_point():
        raise ValueError("attention must be a floating-point tensor of shape (batch, heads, visual)")
    if attention.dim() != 3:
        raise ValueError(f"attention must have shape (batch, heads, visual), got {tuple(attention.shape)}")
    if attention.shape[1] < 1:
        raise ValueError("attention must have at least one head")
    # Variances and standard deviations are unbiased (torch's default, as in the repository): two tokens at least.
    if attention.shape[2] < 2:
        raise ValueError(f"attention must cover at least 2 visual tokens, got {attention.shape[2]}")
    return attention.float()


def _check_num_heads(num_heads: int, heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 1 <= num_heads <= heads:
        raise ValueError(f"num_heads must be an int in [1, {heads}] (the number of heads), got {num_heads!r}")


def _distribution(attention: Tensor) -> Tensor:
    """Softmax over the image tokens of the (already softmaxed) slice, as the repository does before an entropy."""
    return torch.softmax(attention, dim=-1)


def _entropy(attention: Tensor) -> Tensor:
    """(..., visual) -> (...): entropy of `_distribution`, with the repository's log(p + 1e-8)."""
    probs = _distribution(attention)
    return -(probs * torch.log(probs + _EPS)).sum(dim=-1)


# -- the nine fixed strategies: (batch, heads, visual) -> (batch, heads), higher = better ------------------------------
# Each is one branch of `select_heads_by_strategy` in modeling_llama_fastv_fine_head.py.
def score_sum(attention: Tensor) -> Tensor:
    """Total attention of the head on the image (FastV's own signal): sum over visual tokens."""
    return attention.sum(dim=-1)


def score_variance(attention: Tensor) -> Tensor:
    """Unbiased variance of the head's attention over the image tokens."""
    return attention.var(dim=-1)


def score_entropy(attention: Tensor) -> Tensor:
    """Minus the distance of the head's entropy to the mean entropy over the heads of its row (mid entropy wins)."""
    entropy = _entropy(attention)
    return -(entropy - entropy.mean(dim=-1, keepdim=True)).abs()


def score_max_attention(attention: Tensor) -> Tensor:
    """The head's largest attention on any image token."""
    return attention.amax(dim=-1)


def score_attention_range(attention: Tensor) -> Tensor:
    """Largest minus smallest attention over the image tokens."""
    return attention.amax(dim=-1) - attention.amin(dim=-1)


def score_sparsity(attention: Tensor) -> Tensor:
    """Sum of squares of `_distribution` (higher = more peaked)."""
    return _distribution(attention).square().sum(dim=-1)


def score_top_k_sum(attention: Tensor) -> Tensor:
    """Sum of the head's k largest attentions, k = min(64, visual // 4).

    The repository's k is 0 below 4 visual tokens (every score 0); we take k >= 1 there, so the strategy still ranks.
    """
    k = max(1, min(64, attention.shape[-1] // 4))
    return attention.topk(k, dim=-1).values.sum(dim=-1)


def score_weighted_quality(attention: Tensor) -> Tensor:
    """Peak times spread: max attention x unbiased variance."""
    return attention.amax(dim=-1) * attention.var(dim=-1)


def score_gini(attention: Tensor) -> Tensor:
    """Gini coefficient of the head's attention: 2 sum_i i x_(i) / (n sum x) - (n + 1) / n, x ascending, i from 1."""
    n = attention.shape[-1]
    ascending = attention.sort(dim=-1).values
    rank = torch.arange(1, n + 1, device=attention.device, dtype=attention.dtype)
    return 2 * (ascending * rank).sum(dim=-1) / (n * ascending.sum(dim=-1)) - (n + 1) / n


_STRATEGIES: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": score_sum,
    "variance": score_variance,
    "entropy": score_entropy,
    "max_attention": score_max_attention,
    "attention_range": score_attention_range,
    "sparsity": score_sparsity,
    "top_k_sum": score_top_k_sum,
    "weighted_quality": score_weighted_quality,
    "gini": score_gini,
}
HEAD_STRATEGIES: tuple[str, ...] = tuple(_STRATEGIES)


def _check_strategy(strategy: str) -> None:
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown head strategy {strategy!r}; known strategies: {', '.join(HEAD_STRATEGIES)}")


def head_scores(attention: Tensor, strategy: str) -> Tensor:
    """attention (batch, heads, visual) -> (batch, heads) float32 scores of `strategy`, higher = better."""
    _check_strategy(strategy)
    return _STRATEGIES[strategy](_as_float32(attention))


# -- selection result and ranking --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSelection:
    """Which heads drive the token ranking, and with what weight.

    Args:
        weights: (batch, heads) float32, >= 0, each row sums to 1; 0 for heads not chosen.
        num_selected: (batch,) long, number of chosen heads per row.
    """

    weights: Tensor
    num_selected: Tensor

    def __post_init__(self):
        if self.weights.dim() != 2:
            raise ValueError(f"weights must have shape (batch, heads), got {tuple(self.weights.shape)}")
        if self.num_selected.shape != self.weights.shape[:1] or self.num_selected.dtype != torch.long:
            raise ValueError("num_selected must be a (batch,) long tensor matching weights")

    @property
    def selected(self) -> Tensor:
        """(batch, heads) bool, the chosen heads."""
        return self.weights > 0


def rank_heads(scores: Tensor) -> Tensor:
    """(batch, heads) scores -> (batch, heads) long rank, 0 = best; equal scores rank by lowest head index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _top_k_mask(scores: Tensor, k: Tensor | int) -> Tensor:
    """(..., heads) scores, k int or (...) -> (..., heads) bool, the k best heads (ties to the lowest index)."""
    k = torch.as_tensor(k, device=scores.device)
    return rank_heads(scores.flatten(0, -2)).view_as(scores) < k.unsqueeze(-1)


def _masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the heads in `mask` only; exactly 0 elsewhere."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def select_top_heads(attention: Tensor, strategy: str, num_heads: int) -> HeadSelection:
    """The `num_heads` best heads by `head_scores`, weighted by softmax of their scores.

    modeling_llama_fastv_fine_head.py `select_heads_by_strategy`: topk(H) of the scores, softmax over the selected
    scores. attention (batch, heads, visual).
    """
    scores = head_scores(attention, strategy)
    batch, heads = scores.shape
    _check_num_heads(num_heads, heads)
    chosen = _top_k_mask(scores, num_heads)
    return HeadSelection(
        weights=_masked_softmax(scores, chosen),
        num_selected=torch.full((batch,), num_heads, dtype=torch.long, device=scores.device),
    )


def aggregate_heads(attention: Tensor, selection: HeadSelection) -> Tensor:
    """attention (batch, heads, visual) -> (batch, visual) token scores: sum over heads of weight x attention."""
    attention = _as_float32(attention)
    if selection.weights.shape != attention.shape[:2]:
        raise ValueError(
            f"selection.weights has shape {tuple(selection.weights.shape)}, attention has (batch, heads) "
            f"{tuple(attention.shape[:2])}"
        )
    return torch.einsum("bh,bhv->bv", selection.weights.to(attention), attention)


# -- dynamic consensus-diversity selection (the design, steps 1-5) -----------------------------------------------------
# Step 1 — strategy quality.
def strategy_quality(scores: Tensor, attention: Tensor) -> Tensor:
    """Design step 1: quality = 0.4 discriminability + 0.3 balance + 0.3 correlation of one strategy's scores.

    discriminability = unbiased std of the scores over heads; balance = 1 - clamp(range / mean, 0, 1); correlation =
    |cos(scores, attention intensity)|, intensity = each head's attention sum (the design leaves it undefined; the
    repository's `evaluate_strategy_quality` uses the sum, and adds 1e-8 to the mean).
    Args: scores (batch, strategies, heads); attention (batch, heads, visual). Returns (batch, strategies).
    """
    discriminability = scores.std(dim=-1)
    spread = scores.amax(dim=-1) - scores.amin(dim=-1)
    balance = 1.0 - (spread / (scores.mean(dim=-1) + _EPS)).clamp(0, 1)
    intensity = attention.sum(dim=-1).unsqueeze(1)  # (batch, 1, heads)
    correlation = F.cosine_similarity(scores, intensity, dim=-1, eps=_EPS).abs()
    return 0.4 * discriminability + 0.3 * balance + 0.3 * correlation


def strategy_selection_count(quality: Tensor, heads: int) -> Tensor:
    """Design step 1: heads each strategy votes for: int(0.3 H) above quality 0.7, H // 2 above 0.4, else
    int(0.65 H); at least 1 (the design's int(0.3 H) is 0 for H < 4). quality (...) -> (...) long."""
    counts = [max(1, int(heads * 0.3)), max(1, heads // 2), max(1, int(heads * 0.65))]
    high, standard, broad = (torch.tensor(c, device=quality.device) for c in counts)
    return torch.where(quality > 0.7, high, torch.where(quality > 0.4, standard, broad))


# Step 2 — dynamic consensus threshold and quality-weighted votes.
def strategy_consistency(votes: Tensor) -> Tensor:
    """Design step 2's `compute_overlap_ratio_across_strategies`: the design does not define the overlap; we take the
    repository's (`compute_strategy_consistency`): the Jaccard index |A & B| / |A | B| of the head sets of every pair of
    strategies, averaged over pairs. votes (batch, strategies, heads) bool, every set non-empty -> (batch,)."""
    left, right = votes.unsqueeze(2), votes.unsqueeze(1)  # (batch, S, 1, heads), (batch, 1, S, heads)
    jaccard = (left & right).sum(-1) / (left | right).sum(-1)  # (batch, S, S)
    num = votes.shape[1]
    pairs = torch.triu_indices(num, num, offset=1, device=votes.device)
    return jaccard[:, pairs[0], pairs[1]].mean(dim=-1)


def consensus_threshold(consistency: Tensor, base_threshold: float = 1 / 3) -> Tensor:
    """Design step 2: min(0.5, base (1 + c)) above consistency 0.6, max(0.15, 2 base c) below 0.2, else base.

    The design's base is the fixed 1/3 it replaces (also the repository's value at commit 42b76b7).
    (batch,) -> (batch,).
    """
    high = (base_threshold * (1 + consistency)).clamp(max=0.5)
    low = (base_threshold * consistency * 2).clamp(min=0.15)
    base = torch.full_like(consistency, base_threshold)
    return torch.where(consistency > 0.6, high, torch.where(consistency < 0.2, low, base))


def weighted_votes(votes: Tensor, quality: Tensor) -> Tensor:
    """Design step 2: each head collects the quality of every strategy that voted for it.
    votes (batch, strategies, heads) bool, quality (batch, strategies) -> (batch, heads)."""
    return (quality.unsqueeze(-1) * votes).sum(dim=1)


# Step 3 — complexity-aware head count.
def _cosine_matrix(attention: Tensor) -> Tensor:
    """(batch, heads, visual) -> (batch, heads, heads) cosine similarity between the heads' attention rows."""
    unit = F.normalize(attention, p=2, dim=-1)
    return unit @ unit.transpose(-1, -2)


def attention_complexity(attention: Tensor) -> Tensor:
    """Design step 3: 0.4 head diversity + 0.3 normalised entropy + 0.3 normalised variance.

    head diversity = 1 - mean cosine similarity over pairs of distinct heads; normalised entropy = mean over heads of
    the entropy of `_distribution` / log(visual); normalised variance = clamp(mean over heads of the unbiased variance
    / mean attention, 0, 1). The design names the three terms; their formulas are the repository's
    (`compute_attention_complexity`). (batch, heads >= 2, visual) -> (batch,).
    """
    heads, visual = attention.shape[1:]
    off_diagonal = ~torch.eye(heads, dtype=torch.bool, device=attention.device)
    head_diversity = 1 - _cosine_matrix(attention)[:, off_diagonal].mean(dim=-1)
    entropy = _entropy(attention).mean(dim=-1) / math.log(visual)
    variance = (attention.var(dim=-1).mean(dim=-1) / (attention.mean(dim=(1, 2)) + _EPS)).clamp(0, 1)
    return 0.4 * head_diversity + 0.3 * entropy + 0.3 * variance


def gap_based_count(head_votes: Tensor) -> Tensor:
    """Design step 3's `gap_based`, which the design leaves undefined: the repository's natural break of the vote
    distribution (`complexity_aware_head_count`). Sort the votes in descending order; the count is the position of the
    first gap larger than mean + 0.5 std of all gaps (unbiased std), i.e. the heads before the first clear drop; with
    no such gap, or fewer than two gaps to measure, H // 4 (at least 1). (batch, heads) -> (batch,) long."""
    heads = head_votes.shape[-1]
    fallback = max(1, heads // 4)
    descending = head_votes.sort(dim=-1, descending=True).values
    gaps = descending[:, :-1] - descending[:, 1:]
    if gaps.shape[-1] < 2:
        return torch.full(head_votes.shape[:1], fallback, dtype=torch.long, device=head_votes.device)
    significant = gaps > (gaps.mean(dim=-1, keepdim=True) + 0.5 * gaps.std(dim=-1, keepdim=True))
    first = significant.int().argmax(dim=-1)  # first True; 0 when there is none, handled below
    return torch.where(significant.any(dim=-1), first + 1, torch.full_like(first, fallback))


def complexity_head_count(gap_based: Tensor, complexity: Tensor, heads: int) -> Tensor:
    """Design step 3: int(g (1.2 + 0.3 c)) above complexity 0.7, int(g (0.7 + 0.6 c)) below 0.3, else g; clamped to
    [1, heads] (the repository's clamp). (batch,) long, (batch,) -> (batch,) long."""
    g = gap_based.to(complexity.dtype)
    more = torch.floor(g * (1.2 + 0.3 * complexity))
    fewer = torch.floor(g * (0.7 + 0.6 * complexity))
    count = torch.where(complexity > 0.7, more, torch.where(complexity < 0.3, fewer, g))
    return count.long().clamp(1, heads)


# Step 4 — two-level diversity selection.
def consensus_heads(head_votes: Tensor, threshold: Tensor, total_quality: Tensor, target: Tensor) -> Tensor:
    """Design step 4's consensus set: heads whose votes reach `threshold` x the total quality of all strategies
    (the design gives the threshold, the repository how it is applied), at most `target`, most voted first.

    The repository orders candidates by votes + 0.1 x the quality-weighted sum of their raw scores; we order by votes
    alone (ties to the lowest index), since the raw scores of different strategies are on unrelated scales.
    head_votes (batch, heads); threshold, total_quality (batch,); target (batch,) long -> (batch, heads) bool.
    """
    candidates = head_votes >= (threshold * total_quality).unsqueeze(-1)
    ranked = _top_k_mask(head_votes.masked_fill(~candidates, float("-inf")), target)
    return candidates & ranked


def diversity_heads(attention: Tensor, consensus: Tensor, count: Tensor) -> Tensor:
    """Design step 4: `count` more heads, greedily, away from the consensus heads and from each other.

    Level 1: d_c = 1 - mean cosine similarity to the consensus heads; the first pick maximises d_c. Level 2: each
    later pick maximises 0.6 d_c + 0.4 d_s, d_s = 1 - mean cosine similarity to the heads already picked here.
    A row with no consensus head (the design does not say): d_c = 0 and the first pick is the head with the largest
    attention sum, as the repository's `clustering_based_selection` starts.
    attention (batch, heads, visual); consensus (batch, heads) bool; count (batch,) long -> (batch, heads) bool.
    """
    similarity = _cosine_matrix(attention)
    has_consensus = consensus.any(dim=-1, keepdim=True)
    to_consensus = (similarity * consensus.unsqueeze(1)).sum(-1) / consensus.sum(-1, keepdim=True).clamp(min=1)
    from_consensus = torch.where(has_consensus, 1 - to_consensus, torch.zeros_like(to_consensus))
    first_key = torch.where(has_consensus, from_consensus, attention.sum(dim=-1))
    picked = torch.zeros_like(consensus)
    for step in range(int(count.max()) if count.numel() else 0):
        if step == 0:
            key = first_key
        else:
            to_picked = (similarity * picked.unsqueeze(1)).sum(-1) / picked.sum(-1, keepdim=True).clamp(min=1)
            key = 0.6 * from_consensus + 0.4 * (1 - to_picked)
        best = key.masked_fill(consensus | picked, float("-inf")).argmax(dim=-1)  # first maximum = lowest index
        picked = picked | (F.one_hot(best, picked.shape[-1]).bool() & (step < count).unsqueeze(-1))
    return picked


# Step 5 — weight aggregation.
def aggregation_weights(
    attention: Tensor, consensus: Tensor, diversity: Tensor, votes: Tensor, quality: Tensor
) -> Tensor:
    """Design step 5: a consensus head weighs 1 + 0.5 x the mean quality of the strategies that voted for it; a
    diversity head 0.8 + 0.4 x its attention sum / the largest attention sum of the row (the design's
    "normalized_attention_sum"; the normalisation is the repository's); softmax over the chosen heads.
    attention (batch, heads, visual); consensus, diversity (batch, heads) bool; votes (batch, strategies, heads) bool;
    quality (batch, strategies) -> (batch, heads), 0 outside the chosen heads.
    """
    mean_quality = weighted_votes(votes, quality) / votes.sum(dim=1).clamp(min=1)
    strength = attention.sum(dim=-1)
    relative_strength = strength / (strength.amax(dim=-1, keepdim=True) + _EPS)
    logits = torch.where(consensus, 1.0 + 0.5 * mean_quality, 0.8 + 0.4 * relative_strength)
    return _masked_softmax(logits, consensus | diversity)


def consensus_diversity_heads(
    attention: Tensor, strategies: Sequence[str] = HEAD_STRATEGIES, base_threshold: float = 1 / 3
) -> HeadSelection:
    """The repository's dynamic "Intelligent Consensus-Diversity" head selection (the design, steps 1-5).

    Args:
        attention: (batch, heads >= 2, visual) attention probabilities of one query row over the image tokens.
        strategies: the strategies that vote, at least two of `HEAD_STRATEGIES`. The design does not list them; the
            repository voted with eight at first (some outside the nine fixed ones) and three later; we default to
            the nine fixed strategies.
        base_threshold: the consensus threshold before the step-2 adjustment, in (0, 1]; the design's 1/3.
    Returns:
        `HeadSelection`; `num_selected` is the consensus heads plus the diversity heads, in [1, heads].
    """
    attention = _as_float32(attention)
    heads = attention.shape[1]
    if heads < 2:
        raise ValueError(f"attention must have at least 2 heads for the dynamic selection, got {heads}")
    strategies = tuple(strategies)
    for strategy in strategies:
        _check_strategy(strategy)
    if len(strategies) < 2 or len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must name at least two distinct strategies, got {strategies}")
    if not 0 < base_threshold <= 1:
        raise ValueError(f"base_threshold must be in (0, 1], got {base_threshold}")

    # Step 1: every strategy scores the heads, gets a quality, and votes for its top heads.
    scores = torch.stack([_STRATEGIES[s](attention) for s in strategies], dim=1)  # (batch, S, heads)
    quality = strategy_quality(scores, attention)
    votes = _top_k_mask(scores, strategy_selection_count(quality, heads))
    # Step 2: threshold from the strategies' agreement; quality-weighted votes.
    threshold = consensus_threshold(strategy_consistency(votes), base_threshold)
    head_votes = weighted_votes(votes, quality)
    # Step 3: how many heads in all.
    target = complexity_head_count(gap_based_count(head_votes), attention_complexity(attention), heads)
    # Step 4: consensus heads first, then diverse heads up to the target.
    consensus = consensus_heads(head_votes, threshold, quality.sum(dim=-1), target)
    diversity = diversity_heads(attention, consensus, target - consensus.sum(dim=-1))
    # Step 5: weights.
    weights = aggregation_weights(attention, consensus, diversity, votes, quality)
    return HeadSelection(weights=weights, num_selected=(consensus | diversity).sum(dim=-1))
