"""Downsample: a control, not a published method. Before the language model, the image's grid of visual tokens is
average-pooled to a smaller square grid, the baseline any token pruner has to beat at the same count: it keeps
every region of the image, coarser, and looks at nothing (no attention, no similarity).

The rule, for an image of g x g visual tokens (LLaVA-1.5: 24 x 24) and a budget resolved to n tokens:
  - the pooled grid is s x s with s = floor(sqrt(n)), at most g: the largest square grid of at most n tokens, so
    the kept count s * s never exceeds the budget (576 -> 64 keeps 8 x 8 = 64, a 3 x 3 pooling; 144 keeps 12 x 12,
    a 2 x 2 pooling; 128 keeps 11 x 11 = 121; 192 keeps 13 x 13 = 169). `out.pruning[0].kept` and
    `details["grid"]` report what was kept, `details["requested"]` the budget's count;
  - each pooled token is the mean of its window, by adaptive average pooling (`F.adaptive_avg_pool2d`: along each
    axis, window i covers [floor(i * g / s), ceil((i + 1) * g / s)); windows tile the grid when s divides g and
    overlap by a token otherwise);
  - `pool_on="vision"` (default) pools the vision tower's features and projects the pooled ones, as VisionZip's
    merged tokens are handed to layer 0 here; `pool_on="projected"` pools the projected features, the decoder's
    input embeddings of the image;
  - each pooled token takes the entry and the original position of its window's first token (its top-left one, the
    first in raster order), so that the kept positions are a subset of the image's, as for every pruner here, and
    the pooled grid keeps the image's raster order.
A budget of the whole image (s = g) pools nothing: the model runs as without the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcpp_hf.engine.pruning import PruneContext, PruneStage
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.methods.budget import budget_count
from rcpp_hf.methods.prefill_pruner import VisionPruner
from rcpp_hf.methods.registry import register_method

POOL_ON = ("vision", "projected")


def grid_side(num_visual: int) -> int | None:
    """g, the side of the square grid of `num_visual` visual tokens, or None when they do not form one."""
    side = math.isqrt(num_visual)
    return side if side * side == num_visual else None


def pooled_side(count: int, side: int) -> int:
    """s, the side of the pooled grid for a budget of `count` tokens on a g = `side` grid: floor(sqrt(count)) in
    [1, side], the largest square grid of at most `count` tokens."""
    return min(max(math.isqrt(count), 1), side)


def pooling_windows(side: int, pooled: int) -> list[tuple[int, int]]:
    """Along one axis, window i of adaptive average pooling from `side` to `pooled` cells:
    [floor(i * side / pooled), ceil((i + 1) * side / pooled)) (torch's rule), for i in 0..pooled - 1."""
    return [((i * side) // pooled, -(-((i + 1) * side) // pooled)) for i in range(pooled)]


def window_first_tokens(side: int, pooled: int, device=None) -> torch.Tensor:
    """(pooled * pooled,) raster index on the g x g grid of each window's first (top-left) token, windows in raster
    order; increasing and distinct (window starts strictly increase when pooled <= side)."""
    starts = torch.tensor([start for start, _ in pooling_windows(side, pooled)], device=device)
    return (starts[:, None] * side + starts[None, :]).flatten()


def average_pool(features: torch.Tensor, side: int, pooled: int) -> torch.Tensor:
    """Average-pool a grid of tokens: (B, g * g, D) in raster order -> (B, s * s, D) in raster order, float32."""
    batch, num_tokens, width = features.shape
    if num_tokens != side * side:
        raise ValueError(f"{num_tokens} tokens do not form a {side} x {side} grid")
    grid = features.float().transpose(1, 2).reshape(batch, width, side, side)
    return F.adaptive_avg_pool2d(grid, pooled).flatten(2).transpose(1, 2)


@register_method
@dataclass
class Downsample(VisionPruner):
    """Args:
        budget: at most this many visual tokens are kept, a budget (a count of this model's image or a fraction of
            it, `methods/budget.py`): the pooled grid is the largest square of at most that many (see the module
            docstring). Default 64 / 576 (an 8 x 8 grid on LLaVA-1.5, a 3 x 3 pooling).
        pool_on: "vision" (pool the vision features, then project) or "projected" (pool the projected features).
        vision_layer: see `VisionPruner` (the tower records it; downsampling reads the features only).
    """

    name = "downsample"
    pool_on: str = "vision"

    CONTRACT_NEUTRAL = {"budget": 16}  # the tiny image's whole 4 x 4 grid: nothing is pooled
    CONTRACT_ACTING = {"budget": 4}  # 2 x 2 windows: a 2 x 2 grid
    CONTRACT_INVALID = {"budget": 0, "pool_on": "pixels"}
    CONTRACT_MASKABLE = "every kept token enters with the average of its window, not its own features"

    def __post_init__(self):
        super().__post_init__()
        if self.pool_on not in POOL_ON:
            self.fail("pool_on", f"must be one of {POOL_ON}")

    def grid(self, num_visual: int) -> tuple[int, int]:
        """(g, s): the image's grid side and the pooled grid's, for an image of `num_visual` visual tokens."""
        side = grid_side(num_visual)
        if side is None:
            raise ValueError(f"{self.name}: the image's {num_visual} visual tokens do not form a square grid")
        return side, pooled_side(budget_count(self, "budget", num_visual), side)

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        _, pooled = self.grid(num_visual)
        return [PruneStage(layer=0, keep=pooled * pooled)]  # the count kept, at most the budget's

    def select(self, ctx: PruneContext) -> torch.Tensor:
        num_visual = ctx.layout.num_visual
        pooled = self.grid(num_visual)[1]
        ctx.scores = torch.zeros(ctx.layout.visual_slots.shape, device=ctx.hidden.device)  # nothing is ranked
        ctx.details.update(grid=(pooled, pooled), requested=budget_count(self, "budget", num_visual))
        return ctx.layout.visual_slots[:, :0]  # no token stays as it is: every kept one is a window's mean

    def recycle(self, ctx: PruneContext, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        side, pooled = self.grid(ctx.layout.num_visual)
        batch = ctx.hidden.shape[0]
        if self.pool_on == "vision":
            states = ctx.vision.project(average_pool(ctx.vision.features, side, pooled))
        else:
            states = average_pool(gather_tokens(ctx.hidden, ctx.layout.visual_slots), side, pooled)
        columns = window_first_tokens(side, pooled, ctx.hidden.device).expand(batch, -1)  # (B, s * s)
        return columns, states
