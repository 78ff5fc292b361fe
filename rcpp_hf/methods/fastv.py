"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024; pkunlp-icler/FastV).

At layer K, keep the R image tokens that received the most attention at layer K-1, averaged over heads; from layer
K on, only those (and all text) are computed and cached.
  - query "last": the attention of the last prompt token (the official code, `fastv_config` in its modeling file);
  - query "all": averaged over every query token (the paper's description).
R comes from an "equivalent" budget (the average number of visual tokens over all layers), or is given directly as
`keep`; both follow the budget rule (`methods/budget.py`: a count of this model's image or a fraction of it).
EasonAI-5589/LLaVA-FinePruner-Head publishes the equivalences for LLaVA-1.5-7B (576 tokens, 32 layers, K = 2) as
`R_dict`: budget 192 / 128 / 64 -> R = 166 / 98 / 30. They are the solutions of (K * V + (L - K) * R) / L = budget
rounded to the nearest count (`engine.pruning.equivalent_keep`), so on 576 tokens and 32 layers the published budgets
give exactly the published R, and on any other image and depth the same equation gives R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PruneContext, PruneStage, equivalent_keep, scale_layer
from rcpp_hf.methods.budget import budget_count, check_budget, lowest_average, published_fraction, unreachable
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

FASTV_LAYER = 2  # K of the paper, for a 32-layer decoder
FASTV_QUERIES = ("last", "all")
FASTV_BUDGET = published_fraction(128)  # LLaVA-FinePruner-Head's middle budget, 128 of 576 visual tokens


def equivalent_budget_keep(method, field: str, layer: int, num_layers: int, num_visual: int) -> int:
    """R, the visual tokens kept from `layer` on, for the equivalent budget `method.<field>` (FastV's, and random
    pruning's at FastV's stage). Fails naming the field when the budget is larger than the image or below what the
    `layer` unpruned layers already hold on average (with R >= 1), naming the reachable counts."""
    budget = budget_count(method, field, num_visual)
    lowest = lowest_average(num_visual, layer, num_layers)
    if budget < lowest:
        method.fail(field, unreachable(getattr(method, field), num_visual, layer, num_layers, lowest))
    return equivalent_keep(budget, num_visual, layer, num_layers)


@register_method
@dataclass
class FastV(PrefillPruner):
    """Args:
        budget: average visual tokens per layer over the whole decoder, a budget (a count of this model's image or a
            fraction of it, `methods/budget.py`); R is derived from it. Default 128 / 576 (LLaVA-FinePruner-Head's
            192 / 128 / 64 of 576 are 0.3333 / 0.2222 / 0.1111). Ignored when `keep` is set.
        keep: R, the visual tokens kept from layer K on, a budget (None: from `budget`).
        layer: K, a layer index of this model (None: 2 of 32, scaled by depth).
        query: "last" (official code) or "all" (paper).
    """

    name = "fastv"
    budget: int | float = FASTV_BUDGET
    keep: int | float | None = None
    layer: int | None = None
    query: str = "last"

    CONTRACT_NEUTRAL = {"keep": 16}  # every visual token of the tiny model's image
    CONTRACT_ACTING = {"budget": 6}  # the default (4 of the tiny image's 16 tokens) is unreachable on 4 layers
    CONTRACT_INVALID = {"budget": 0, "query": "first"}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        check_budget(self, "budget")
        check_budget(self, "keep", optional=True)
        if self.layer is not None and not (isinstance(self.layer, int) and self.layer >= 1):
            self.fail("layer", "must be None or an integer >= 1 (a decoder layer; pruning needs one before it)")
        if self.query not in FASTV_QUERIES:
            self.fail("query", f"must be one of {FASTV_QUERIES}")

    def pruning_layer(self, num_layers: int) -> int:
        return self.layer if self.layer is not None else scale_layer(FASTV_LAYER, num_layers)

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        layer = self.pruning_layer(num_layers)
        if self.keep is not None:
            return [PruneStage(layer=layer, keep=budget_count(self, "keep", num_visual))]
        return [PruneStage(layer=layer, keep=equivalent_budget_keep(self, "budget", layer, num_layers, num_visual))]

    def query_rows(self, ctx: PruneContext) -> torch.Tensor:
        """(B, q) the query rows whose attention ranks the image tokens."""
        if self.query == "last":
            return ctx.last_prompt_rows()
        batch, seq = ctx.layout.valid.shape
        return torch.arange(seq, device=ctx.hidden.device).expand(batch, -1)

    def head_attention(self, ctx: PruneContext) -> torch.Tensor:
        """(B, H, Vl) attention each head gives each visual entry, averaged over the query rows (valid ones)."""
        rows = self.query_rows(ctx)
        probs = ctx.visual_columns(ctx.attention_rows(rows))  # (B, H, q, Vl)
        weights = ctx.layout.valid.gather(1, rows).float()  # padding rows do not vote
        return (probs * weights[:, None, :, None]).sum(2) / weights.sum(1).clamp_min(1.0)[:, None, None]

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return self.head_attention(ctx).mean(dim=1)

