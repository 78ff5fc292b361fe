"""Random pruning: the control a learned or attention-based pruner has to beat at the same token counts.

At each stage, a uniformly random subset of the visual tokens still present survives; the engine keeps them at their
original positions and drops the rest physically, as for every other prefill pruner. The draw depends only on
(`seed`, the stage's layer, the number of entries present), the same for every row of a batch, so a row's tokens do
not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.pruning import PruneContext, PruneStage
from rcpp_hf.methods.fastv import FastV
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method


@register_method
@dataclass
class RandomPruning(PrefillPruner):
    """Args:
        budget: average visual tokens per layer; one stage at FastV's layer (2 of 32, scaled), keeping what FastV
            keeps at that budget. Ignored when `layers` is set.
        layers: the stage layers, increasing (each the first layer to run pruned); with `keep`.
        keep: visual tokens kept from each stage on, one per layer, non-increasing.
        seed: the random stream.
    """

    name = "random"
    budget: int = 128
    layers: tuple[int, ...] | None = None
    keep: tuple[int, ...] | None = None
    seed: int = 0

    CONTRACT_NEUTRAL = {"layers": (1, 2), "keep": (16, 16)}
    CONTRACT_ACTING = {"budget": 6}
    CONTRACT_INVALID = {"budget": 0, "seed": 1.5}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        self.layers = None if self.layers is None else tuple(self.layers)
        self.keep = None if self.keep is None else tuple(self.keep)
        if not (isinstance(self.budget, int) and self.budget >= 1):
            self.fail("budget", "must be an integer >= 1 (visual tokens)")
        if (self.layers is None) != (self.keep is None):
            self.fail("layers", "and keep go together: give both (explicit stages) or neither (one stage from budget)")
        if self.layers is not None:
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
                self.fail("layers", "must be increasing layer indices >= 1")
            if len(self.keep) != len(self.layers):
                self.fail("keep", f"needs one count per layer ({len(self.layers)})")
            if any(not (isinstance(k, int) and k >= 1) for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
                self.fail("keep", "must be non-increasing integers >= 1 (visual tokens)")
        if not isinstance(self.seed, int):
            self.fail("seed", "must be an integer")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        if self.layers is None:
            return FastV(budget=self.budget).resolve_stages(num_layers, num_visual)
        if self.layers[-1] > num_layers - 1:
            self.fail("layers", f"must lie below this model's {num_layers} decoder layers")
        if self.keep[0] > num_visual:
            self.fail("keep", f"is larger than the image's {num_visual} visual tokens")
        return [PruneStage(layer, keep) for layer, keep in zip(self.layers, self.keep)]

    def attention_layer(self, stage: PruneStage) -> None:
        return None

    def score(self, ctx: PruneContext) -> torch.Tensor:
        """Uniform scores (B, Vl), one draw shared by the rows."""
        batch, present = ctx.layout.visual_slots.shape
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.stage.layer)
        return torch.rand(present, generator=generator).to(ctx.hidden.device).expand(batch, -1)
