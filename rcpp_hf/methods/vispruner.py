"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025; Theia-4869/VisPruner, `llava/model/llava_arch.py`, `encode_images`).

Before the language model: of T kept visual tokens, T * r are "important" (the most attended by the vision tower's
CLS token at the feature layer, head-mean) and T * (1 - r) are "diverse": the rest are de-duplicated by iterative
bipartite cosine matching on the vision features until that many remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcpp_hf.engine.pruning import PruneContext
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.methods.budget import published_fraction, resolve_budget
from rcpp_hf.methods.prefill_pruner import VisionPruner
from rcpp_hf.methods.registry import register_method

DEDUPLICATION_STEP = 8  # tokens removed per matching round (`r = min(8, R - T_div)` in `encode_images`)
SMALL_BUDGET = published_fraction(64)  # at or below it the README's important ratio is 0.75


def important_tokens(cls_attention: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank visual tokens by CLS attention (B, V), highest first (ties to the lower index) -> the top `count` (B,
    count) and the rest (B, V - count), both in rank order (the rest's order seeds the matching)."""
    order = torch.sort(cls_attention, dim=-1, descending=True, stable=True).indices
    return order[:, :count], order[:, count:]


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor, keep: int) -> torch.Tensor:
    """Iterative bipartite de-duplication (`encode_images`, "Remove duplicate tokens"): while more than `keep` remain,
    split the remaining tokens alternately into A (even places) and B (odd places), score each A token by its
    highest cosine similarity to any B token, and drop the min(8, excess) most similar A tokens. The kept A tokens
    (in decreasing similarity) then all B tokens form the next order.

    Args:
        features: (batch, V, D) the vision features.
        residual: (batch, R) the candidate tokens, in order.
        keep: tokens to keep, in [0, R].
    Returns:
        (batch, keep) token indices.
    """
    if not 0 <= keep <= residual.shape[1]:
        raise ValueError(f"keep must be in [0, {residual.shape[1]}], got {keep}")
    if keep == 0:
        return residual[:, :0]
    normed = F.normalize(features.float(), dim=-1)
    while (excess := residual.shape[1] - keep) > 0:
        step = min(DEDUPLICATION_STEP, excess)
        tokens = gather_tokens(normed, residual)
        similarity = (tokens[:, ::2] @ tokens[:, 1::2].transpose(1, 2)).max(dim=-1).values  # (batch, |A|)
        distinct = torch.sort(similarity, dim=-1, descending=True, stable=True).indices[:, step:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)
    return residual


@register_method
@dataclass
class VisPruner(VisionPruner):
    """Args:
        budget: T, visual tokens kept: a budget (see `VisionPruner`; default 64 / 576).
        important_ratio: r, the share of T chosen by CLS attention; None: 0.5, or 0.75 at budgets at or below
            64 / 576 of the image once resolved (the pairs of its README: (128, 0.5), (64, 0.75)).
        vision_layer: see `VisionPruner`.
    """

    name = "vispruner"
    important_ratio: float | None = None

    CONTRACT_NEUTRAL = {"budget": 16}
    CONTRACT_ACTING = {"budget": 5}
    CONTRACT_INVALID = {"budget": 0, "important_ratio": 1.5}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        super().__post_init__()
        if self.important_ratio is not None and not 0.0 <= self.important_ratio <= 1.0:
            self.fail("important_ratio", "must be None or lie in [0, 1]")

    def ratio(self, keep: int, num_visual: int) -> float:
        """r for `keep` resolved tokens of an image of `num_visual`."""
        if self.important_ratio is not None:
            return self.important_ratio
        return 0.75 if keep <= resolve_budget(SMALL_BUDGET, num_visual) else 0.5

    def select(self, ctx: PruneContext) -> torch.Tensor:
        keep = ctx.stage.keep
        num_important = int(keep * self.ratio(keep, ctx.layout.num_visual))  # int() as `important_token_num`
        attention = ctx.vision.cls_attention().mean(dim=1)  # (B, V) head-mean
        ctx.scores = attention
        important, residual = important_tokens(attention, num_important)
        diverse = remove_duplicates(ctx.vision.features, residual, keep - num_important)
        ctx.details.update(important=num_important, diverse=keep - num_important)
        return torch.cat([important, diverse], dim=1)
