"""Consumed-evidence gating (`RCPPGenerationConfig.evidence_gating`, off by default): an extension of RCPP + DRCD
that is this library's, not the method description's.

A cached visual token may join N, or be evicted, only once the decoding has "consumed" it: its cumulative attention
(the decoder's attention on it, summed over the steps so far) is above the median of the cached tokens', or its S
has once cleared the grouping threshold. The other tokens are protected: grouping keeps them in C, and eviction
takes them only when the budget needs more tokens than are eligible. Each part is one pure function here;
`methods.rcpp.RCPPState` calls them.

Shapes (docs/architecture.md): B = batch, Vc = visual tokens still cached, Ls = scoring layers, k = evicted count.
"""

from __future__ import annotations

import torch

# Added to a protected token's S in the eviction key. S is a clamped cosine (and an EMA of such), in [-1, 1], so any
# offset above 2 sorts every protected token after every eligible one while keeping the order by S within each group.
PROTECTED_OFFSET = 4.0


def accumulate_attention(attention_sum: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """Cumulative decoder-to-vision attention: attention_sum + mean_l alpha[t, i, l], started from the first step's
    mean (`attention_sum is None`, the prompt's forward).  (B, Vc) or None, alpha (B, Ls, Vc) -> (B, Vc) float32.

    alpha is the attention stage 2 already records (the main row's head-mean probabilities on the scoring layers);
    the mean over the scoring layers weighs each layer alike."""
    step = alpha.float().mean(dim=1)
    return step if attention_sum is None else attention_sum + step


def update_once_consistent(
    once: torch.Tensor | None, scores: torch.Tensor, threshold: torch.Tensor | float
) -> torch.Tensor:
    """The "S has once been >= the grouping threshold" flag: once | (S >= threshold), started all False
    (`once is None`).  (B, Vc) bool or None, S (B, Vc), threshold float or (B, 1) (`stages.grouping_threshold` of
    the same S) -> (B, Vc) bool. The first call is at step 0 with the S the prefill gave, so a token whose prefill S
    clears the threshold is eligible from the first grouping on."""
    reached = scores >= threshold
    return reached if once is None else once | reached


def protected_tokens(attention_sum: torch.Tensor, once: torch.Tensor) -> torch.Tensor:
    """Tokens not yet consumed: cumulative attention not above the row's median and S never at the threshold.
    (B, Vc) float, (B, Vc) bool -> (B, Vc) bool, True = protected.

    The median is taken over the tokens still cached (every column here), not over the image's V tokens: an evicted
    token's sum stops growing, so counting it would let the tokens already gone move the bar for the ones left. It
    is the lower median (`torch.median`: with an even count the smaller middle value), so with n cached tokens and no
    ties floor(n / 2) are above it. Every row holds the same count (eviction takes as many from each row)."""
    if attention_sum.shape[1] == 0:
        return once.clone()
    median = attention_sum.median(dim=1, keepdim=True).values
    return ~((attention_sum > median) | once)


def eviction_key(scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Stage 7's key with gating: S + PROTECTED_OFFSET * protected, lowest evicted first, so that every eligible
    token goes (lowest S first) before any protected one (lowest S first among them).  (B, Vc), (B, Vc) bool ->
    (B, Vc)."""
    return scores + PROTECTED_OFFSET * protected.to(scores.dtype)


def count_protected(protected: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """How many of the evicted `columns` were protected, per row: the tokens the budget forced out.
    (B, Vc) bool, (B, k) column indices -> (B,) long."""
    return protected.gather(1, columns).sum(dim=1)
