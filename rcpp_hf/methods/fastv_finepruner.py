"""FastV + FinePruner (EasonAI-5589/LLaVA-FinePruner-Head): FastV whose token ranking uses only selected attention
heads.

At layer K-1, the last prompt token's attention over the image, per head (B, H, V), scores each head by one of the nine
fixed strategies (top-H heads, weighted by softmax of their scores) or by the repository's dynamic "Intelligent
Consensus-Diversity Selection" (its `.claude/CLAUDE.md`); the selected heads' weighted attention ranks the image tokens;
FastV keeps the top R from layer K on. The maths lives in `head_selection.py`; the number of heads chosen per row is
reported in `PruneRecord.details["num_heads"]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PruneContext
from rcpp_hf.methods.fastv import FastV
from rcpp_hf.methods.head_selection import (
    HEAD_STRATEGIES,
    aggregate_heads,
    consensus_diversity_heads,
    select_top_heads,
)
from rcpp_hf.methods.registry import register_method

DYNAMIC = "consensus_diversity"


@register_method
@dataclass
class FastVFinePruner(FastV):
    """FastV's settings, plus:
        head_strategy: one of the nine fixed strategies (`head_selection.HEAD_STRATEGIES`), or "consensus_diversity"
            (the repository's dynamic selection, which chooses the number of heads itself).
        num_heads: H, the heads kept by a fixed strategy (8 / 16 / 24 / 32 in the study); ignored by the dynamic one.
    """

    name = "fastv_finepruner"
    head_strategy: str = "sum"
    num_heads: int = 8

    CONTRACT_NEUTRAL = {"keep": 16}
    CONTRACT_ACTING = {"budget": 6, "num_heads": 2}  # the tiny model has 4 heads, fewer than the default 8
    CONTRACT_INVALID = {"head_strategy": "loudest", "num_heads": 0}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        super().__post_init__()
        if self.head_strategy not in (*HEAD_STRATEGIES, DYNAMIC):
            self.fail("head_strategy", f"must be one of {(*HEAD_STRATEGIES, DYNAMIC)}")
        if not (isinstance(self.num_heads, int) and self.num_heads >= 1):
            self.fail("num_heads", "must be an integer >= 1")

    def score(self, ctx: PruneContext) -> torch.Tensor:
        attention = self.head_attention(ctx)  # (B, H, Vl)
        if self.head_strategy == DYNAMIC:
            selection = consensus_diversity_heads(attention)
        else:
            if self.num_heads > attention.shape[1]:
                self.fail("num_heads", f"exceeds the model's {attention.shape[1]} attention heads")
            selection = select_top_heads(attention, self.head_strategy, self.num_heads)
        ctx.details["num_heads"] = selection.num_selected.tolist()
        return aggregate_heads(attention, selection)
