"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024; pkunlp-icler/FastV).

At layer K, keep the R image tokens that received the most attention at layer K-1, averaged over heads; from layer
K on, only those (and all text) are computed and cached.
  - query "last": the attention of the last prompt token (the official code, `fastv_config` in its modeling file);
  - query "all": averaged over every query token (the paper's description).
R comes from an "equivalent" budget (the average number of visual tokens over all layers, FinePruner's `R_dict`), or
is given directly as `keep`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PruneContext, PruneStage, equivalent_keep, scale_layer
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

FASTV_LAYER = 2  # K of the paper, for a 32-layer decoder
FASTV_QUERIES = ("last", "all")


@register_method
@dataclass
class FastV(PrefillPruner):
    """Args:
        budget: average visual tokens per layer over the whole decoder (of this model's image), e.g. 192 / 128 / 64
            of 576; R is derived from it. Ignored when `keep` is set.
        keep: R, the visual tokens kept from layer K on (None: from `budget`).
        layer: K on this model (None: 2 of 32, scaled by depth).
        query: "last" (official code) or "all" (paper).
    """

    name = "fastv"
    budget: int = 128
    keep: int | None = None
    layer: int | None = None
    query: str = "last"

    CONTRACT_NEUTRAL = {"keep": 16}  # every visual token of the tiny model's image
    CONTRACT_ACTING = {"budget": 6}  # the default 128 is more than the tiny image's 16 tokens
    CONTRACT_INVALID = {"budget": 0, "query": "first"}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        if not (isinstance(self.budget, int) and self.budget >= 1):
            self.fail("budget", "must be an integer >= 1 (visual tokens)")
        if self.keep is not None and not (isinstance(self.keep, int) and self.keep >= 1):
            self.fail("keep", "must be None or an integer >= 1 (visual tokens)")
        if self.layer is not None and not (isinstance(self.layer, int) and self.layer >= 1):
            self.fail("layer", "must be None or an integer >= 1 (a decoder layer; pruning needs one before it)")
        if self.query not in FASTV_QUERIES:
            self.fail("query", f"must be one of {FASTV_QUERIES}")

    def pruning_layer(self, num_layers: int) -> int:
        return self.layer if self.layer is not None else scale_layer(FASTV_LAYER, num_layers)

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        layer = self.pruning_layer(num_layers)
        keep = self.keep if self.keep is not None else self.keep_for_budget(layer, num_layers, num_visual)
        if keep > num_visual:
            self.fail("keep", f"is larger than the image's {num_visual} visual tokens")
        return [PruneStage(layer=layer, keep=keep)]

    def keep_for_budget(self, layer: int, num_layers: int, num_visual: int) -> int:
        if self.budget > num_visual:
            self.fail("budget", f"is larger than the image's {num_visual} visual tokens")
        if self.budget * num_layers - layer * num_visual < num_layers - layer:
            self.fail("budget", f"is too small for pruning before layer {layer} of {num_layers}: the layers before it "
                                f"already hold {layer * num_visual / num_layers:.1f} visual tokens on average")
        return equivalent_keep(self.budget, num_visual, layer, num_layers)

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

