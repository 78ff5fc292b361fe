"""SID, Self-Introspective Decoding (Huo et al., "Self-Introspective Decoding: Alleviating Hallucinations for Large
Vision-Language Models", ICLR 2025; huofushuo/SID).

The contrast branch keeps only the LEAST-attended visual tokens after an early layer (the paper's Context and
Text-aware Token Selection): before layer K (2 of LLaVA-1.5's 32), the head-averaged attention of the last token at
layer K - 1 ranks the image tokens and the `keep` lowest (100 of 576) stay; from layer K on that branch computes and
caches only them. It amplifies the vision-and-text association hallucination that the fusion then subtracts:
(1 + alpha) * l - alpha * l_SID under the adaptive plausibility cutoff (`methods.contrastive_decoder`).

Settings from the official code (`pope_eval.py`, `vcd_sample.py`): K = `fast_v_agg_layer` = 2, 100 tokens kept
(`fast_v_attention_rank`, `topk(largest=False)`), alpha = 0.5 (`cd_alpha` is not passed, so its default holds),
beta = 0.1. Deviations: the selection is made once, by the last prompt token, and the tokens are dropped from the
branch (the engine's prefill pruning); the official code masks them and re-selects at every step from the current
token's attention, and its greedy mode takes the argmax of the fused logits without the cutoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PrefillPruningTap, PruneContext, scale_layer
from rcpp_hf.methods.budget import budget_count, check_budget, published_fraction
from rcpp_hf.methods.contrastive_decoder import ContrastiveDecoder
from rcpp_hf.methods.fastv import FastV
from rcpp_hf.methods.registry import register_method

SID_LAYER = 2  # K for a 32-layer decoder (`fast_v_agg_layer`)
SID_KEEP = published_fraction(100)  # 100 visual tokens kept of 576 (`fast_v_attention_rank`)


class LeastAttended(FastV):
    """FastV's selection inverted: keep the `keep` visual tokens the last prompt token attends to LEAST at layer
    K - 1 (head mean). The contrast branch's prefill pruner; not a registry method of its own."""

    def score(self, ctx: PruneContext) -> torch.Tensor:
        return -super().score(ctx)


@register_method
@dataclass
class SID(ContrastiveDecoder):
    """Args:
        alpha: contrast weight a of (1 + a) l - a l_SID, >= 0 (0 decodes as greedy / plain sampling).
        plausibility_beta: tokens with p < beta * max p (main branch) are excluded, in [0, 1] (0: no cutoff).
        layer: K, the first layer whose contrast branch holds only the kept tokens, a layer index of this model
            (None: 2 of 32, scaled by depth).
        keep: visual tokens the contrast branch keeps, a budget (a count of this model's image or a fraction of it,
            `methods/budget.py`); default 100 / 576.
    """

    name = "sid"
    alpha: float = 0.5
    plausibility_beta: float = 0.1
    layer: int | None = None
    keep: int | float = SID_KEEP

    CONTRACT_NEUTRAL = {"alpha": 0.0, "plausibility_beta": 0.0}
    CONTRACT_INVALID = {"layer": 0, "keep": 0}

    def __post_init__(self):
        self.check_weights()
        if self.layer is not None and not (isinstance(self.layer, int) and not isinstance(self.layer, bool)
                                           and self.layer >= 1):  # fmt: skip
            self.fail("layer", "must be None or an integer >= 1 (the selection reads the layer before it)")
        check_budget(self, "keep")

    def selection(self, num_layers: int, num_visual: int) -> LeastAttended:
        """The contrast branch's pruner on a decoder of `num_layers` layers and an image of `num_visual` tokens."""
        layer = self.layer if self.layer is not None else scale_layer(SID_LAYER, num_layers)
        if layer >= num_layers:
            self.fail("layer", f"is out of range for a decoder with {num_layers} layers (valid: 1..{num_layers - 1})")
        return LeastAttended(keep=budget_count(self, "keep", num_visual), layer=layer, query="last")

    def check_fits(self, num_layers: int, num_visual: int) -> None:
        self.selection(num_layers, num_visual)

    def contrast_taps(self, language_model, num_visual):
        pruner = self.selection(language_model.config.num_hidden_layers, num_visual)
        return [PrefillPruningTap(pruner, language_model, num_visual)]
