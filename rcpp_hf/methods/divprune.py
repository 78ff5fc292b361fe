"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025;
vbdi/divprune, `LLaVA/llava/model/llava_arch.py`, `DivPrune` and its call in `prepare_inputs_labels_for_multimodal`).

Before the language model (`LAYER_INDEX=0` of the repository's scripts): keep the subset of visual tokens that
is most diverse, a max-min diversity problem solved greedily on the projected visual features (the decoder's input
embeddings of the image, i.e. `get_image_features`), with the cosine distance d(i, j) = 1 - cos(x_i, x_j):
  1. the first token is the one farthest from its nearest other token (`max_i min_{j != i} d(i, j)`; the
     repository's second-smallest entry of each column, the smallest being the token's own distance, 0);
  2. each next token is the one farthest from the tokens already kept (`argmax_j min_{s in S} d(s, j)`);
until `budget` tokens are kept (the repository's `int(round(SUBSET_RATIO * 576))`; its default ratio 0.098, 56 of
576, is this method's default as the same fraction). Dropped tokens are never computed by any decoder layer.

Deviations (docs/methods/divprune.md):
  - positions: kept tokens keep their original positions, as every pruner here (the engine's rule); the repository
    hands the shortened sequence on with `position_ids` None, so the decoder numbers it contiguously;
  - each row of a batch selects on its own (the repository reads row 0 of a batch of one, the image at a fixed
    offset, `SYS_TOKEN_LEN = 35`); distances are float32 (the repository's are in the model's dtype);
  - a token already kept is never picked again (the repository's argmax can return one when every remaining token is
    at distance 0 from the kept ones, exact duplicates, and then keeps fewer distinct tokens).
The repository selects on the projected features only (its scripts set `LAYER_INDEX=0`), and so does this method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcpp_hf.engine.pruning import PruneContext, PruneStage
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.methods.budget import budget_count, check_budget
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

DIVPRUNE_RATIO = 0.098  # `SUBSET_RATIO=0.098` of `run_Divprune.sh`, the README's default retained ratio


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """The repository's `1 - pairwise_cosine_similarity`: (B, N, D) -> (B, N, N) float32."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - unit @ unit.transpose(1, 2)


def max_min_diversity(distance: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy max-min diversity (the repository's `DivPrune` loop), batched: the first item maximises its distance
    to its nearest other item; each next one, among the items not chosen, maximises its distance to the nearest
    chosen item. Ties go to the lower index (as `torch.argmax`).

    Args:
        distance: (B, N, N) symmetric distances.
        count: items to choose, in [1, N].
    Returns:
        (B, count) distinct item indices, in the order chosen.
    """
    batch, num_items, _ = distance.shape
    if not 1 <= count <= num_items:
        raise ValueError(f"count must be in [1, {num_items}], got {count}")
    if num_items == 1:
        return torch.zeros(batch, 1, dtype=torch.long, device=distance.device)
    rows = torch.arange(batch, device=distance.device)
    own = torch.eye(num_items, dtype=torch.bool, device=distance.device)
    isolation = distance.masked_fill(own, float("inf")).min(dim=1).values  # (B, N): distance to the nearest other
    chosen = [isolation.argmax(dim=-1)]
    nearest = distance[rows, chosen[0]]  # (B, N): distance to the nearest chosen item
    taken = torch.zeros(batch, num_items, dtype=torch.bool, device=distance.device)
    taken[rows, chosen[0]] = True
    for _ in range(count - 1):
        best = nearest.masked_fill(taken, -float("inf")).argmax(dim=-1)
        chosen.append(best)
        taken[rows, best] = True
        nearest = torch.minimum(nearest, distance[rows, best])
    return torch.stack(chosen, dim=1)


@register_method
@dataclass
class DivPrune(PrefillPruner):
    """Args:
        budget: visual tokens kept before layer 0, a budget (a count of this model's image or a fraction of it,
            `methods/budget.py`). Default 0.098, the repository's `SUBSET_RATIO` (56 of LLaVA-1.5's 576).
    """

    name = "divprune"
    budget: int | float = DIVPRUNE_RATIO

    CONTRACT_NEUTRAL = {"budget": 16}  # every visual token of the tiny model's image
    CONTRACT_ACTING = {"budget": 5}
    CONTRACT_INVALID = {"budget": 0}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        check_budget(self, "budget")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        return [PruneStage(layer=0, keep=budget_count(self, "budget", num_visual))]

    def attention_layer(self, stage: PruneStage) -> None:
        return None  # it reads no attention: the features alone

    @staticmethod
    def features(ctx: PruneContext) -> torch.Tensor:
        """(B, V, D) the projected visual features: the image's entries of the decoder's input at layer 0."""
        return gather_tokens(ctx.hidden, ctx.layout.visual_slots)

    def select(self, ctx: PruneContext) -> torch.Tensor:
        chosen = max_min_diversity(cosine_distance(self.features(ctx)), ctx.stage.keep)
        rank = -torch.arange(chosen.shape[1], dtype=torch.float32, device=chosen.device).expand_as(chosen)
        # (B, V): earlier picks score higher, tokens not picked lowest
        ctx.scores = torch.full(ctx.layout.visual_slots.shape, -float("inf"), device=chosen.device).scatter(
            1, chosen, rank)
        return chosen
