"""Random pruning: the control a learned or attention-based pruner has to beat at the same token counts.

At each stage, a uniformly random subset of the visual tokens still present survives; the engine keeps them at their
original positions and drops the rest physically, as for every other prefill pruner. The draw depends only on
(`seed`, the stage's layer, the number of entries present), the same for every row of a batch, so a row's tokens do
not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PruneContext, PruneStage, scale_layer
from rcpp_hf.methods.budget import budget_count, budget_problem, budget_rule, check_budget, comparable
from rcpp_hf.methods.fastv import FASTV_BUDGET, FASTV_LAYER, equivalent_budget_keep
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method


@register_method
@dataclass
class RandomPruning(PrefillPruner):
    """Args:
        budget: average visual tokens per layer, a budget (`methods/budget.py`; default FastV's, 128 / 576); one
            stage at FastV's layer (2 of 32, scaled by depth), keeping what FastV keeps at that budget. Ignored when
            `layers` is set.
        layers: the stage layers, this model's layer indices, increasing (each the first layer to run pruned); with
            `keep`.
        keep: visual tokens kept from each stage on, one budget per layer, non-increasing once resolved.
        seed: the random stream.
    """

    name = "random"
    budget: int | float = FASTV_BUDGET
    layers: tuple[int, ...] | None = None
    keep: tuple[int | float, ...] | None = None
    seed: int = 0

    CONTRACT_NEUTRAL = {"layers": (1, 2), "keep": (16, 16)}
    CONTRACT_ACTING = {"budget": 6}
    CONTRACT_INVALID = {"budget": 0, "seed": 1.5}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        self.layers = None if self.layers is None else tuple(self.layers)
        self.keep = None if self.keep is None else tuple(self.keep)
        check_budget(self, "budget")
        if (self.layers is None) != (self.keep is None):
            self.fail("layers", "and keep go together: give both (explicit stages) or neither (one stage from budget)")
        if self.layers is not None:
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
                self.fail("layers", "must be increasing layer indices >= 1")
            if len(self.keep) != len(self.layers):
                self.fail("keep", f"needs one count per layer ({len(self.layers)})")
            if any(budget_problem(k) is not None for k in self.keep):
                self.fail("keep", f"must be budgets, each {budget_rule()}")
            if any(comparable(a, b) and b > a for a, b in zip(self.keep, self.keep[1:])):
                self.fail("keep", "must be non-increasing (a stage cannot keep more than the one before)")
        if not isinstance(self.seed, int):
            self.fail("seed", "must be an integer")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        if self.layers is None:
            layer = scale_layer(FASTV_LAYER, num_layers)
            return [PruneStage(layer, equivalent_budget_keep(self, "budget", layer, num_layers, num_visual))]
        if self.layers[-1] > num_layers - 1:
            self.fail("layers", f"must lie below this model's {num_layers} decoder layers")
        keeps = [budget_count(self, "keep", num_visual, keep) for keep in self.keep]
        if keeps != sorted(keeps, reverse=True):
            self.fail("keep", f"must not increase once resolved: {keeps} of {num_visual} visual tokens")
        return [PruneStage(layer, keep) for layer, keep in zip(self.layers, keeps)]

    def attention_layer(self, stage: PruneStage) -> None:
        return None

    def score(self, ctx: PruneContext) -> torch.Tensor:
        """Uniform scores (B, Vl), one draw shared by the rows."""
        batch, present = ctx.layout.visual_slots.shape
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.stage.layer)
        return torch.rand(present, generator=generator).to(ctx.hidden.device).expand(batch, -1)
