"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025;
dvlab-research/VisionZip, `visionzip/clip_encoder.py`, `CLIPEncoder_forward` / `apply_info`).

Before the language model: "dominant" tokens are the most attended by the CLS token at the feature layer (attention
summed over heads); the other tokens are merged into "contextual" tokens: uniformly strided targets among them, each
remaining token assigned to its most similar target by key cosine (head-mean keys of the same layer), and a target
becomes its own features plus the mean of its members' (the repository's `target_hidden + aggregated_hidden`).
Published splits 54 + 10, 108 + 20, 162 + 30 of 64 / 128 / 192: dominant = T * 27 / 32, for any T.

Deviations: the repository also keeps CLIP's CLS token among the dominant ones; llava-hf's "default" feature
selection has no slot for it, so all T kept tokens are patches. A contextual token is merged on the vision
features, then projected, and takes the place (and original position) of its target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcpp_hf.engine.layout import first_true_columns
from rcpp_hf.engine.pruning import PruneContext, PruneStage
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.methods.budget import budget_count, check_budget, comparable
from rcpp_hf.methods.prefill_pruner import VisionPruner
from rcpp_hf.methods.registry import register_method

DOMINANT_SHARE = 27 / 32  # 54 / 64 = 108 / 128 = 162 / 192


def visionzip_split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) tokens for `budget`: the published splits, at the same share for any budget."""
    dominant = round(budget * DOMINANT_SHARE)
    return dominant, budget - dominant


def merge_contextual(
    features: torch.Tensor, keys: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge R tokens into `count` contextual tokens (the repository's "Contextual Visual Tokens").

    Targets are every `max(1, R // count)`-th token (the first `count` of them); every other token joins the target
    of highest key cosine (ties to the first target); a target's merged features are its own plus the plain mean of
    its members' (its own alone when it has none).

    Args:
        features: (batch, R, D) the tokens' vision features, in image order.
        keys: (batch, R, d) their keys.
        count: contextual tokens, in [1, R].
    Returns:
        the targets' places (count,) in [0, R), and their merged features (batch, count, D) in float32.
    """
    num_tokens = features.shape[1]
    if not 1 <= count <= num_tokens:
        raise ValueError(f"count must be in [1, {num_tokens}], got {count}")
    targets = torch.arange(0, num_tokens, max(1, num_tokens // count), device=features.device)[:count]
    is_target = torch.zeros(num_tokens, dtype=torch.bool, device=features.device).index_fill(0, targets, True)
    normed = F.normalize(keys.float(), dim=-1)
    similarity = normed[:, ~is_target] @ normed[:, targets].transpose(1, 2)  # (batch, R - count, count)
    assign = F.one_hot(similarity.argmax(dim=-1), count).float()
    members = assign.transpose(1, 2) @ features[:, ~is_target].float()  # (batch, count, D) sums
    merged = features[:, targets].float() + members / assign.sum(dim=1).clamp_min(1.0)[:, :, None]
    return targets, merged


@register_method
@dataclass
class VisionZip(VisionPruner):
    """Args:
        budget: T, visual tokens kept, dominant + contextual: a budget (see `VisionPruner`; default 64 / 576).
        contextual: contextual tokens, a budget (0 allowed: none), below T once both are resolved; None: the
            published share (T - round(T * 27 / 32)).
        vision_layer: see `VisionPruner`.
    """

    name = "visionzip"
    contextual: int | float | None = None

    CONTRACT_NEUTRAL = {"budget": 16}
    CONTRACT_ACTING = {"budget": 7}  # the default resolves to 2 of the tiny image's 16 tokens: no contextual one
    CONTRACT_INVALID = {"budget": 0, "contextual": -1}
    CONTRACT_MASKABLE = "its contextual tokens enter with the merged features of the tokens it drops"

    def __post_init__(self):
        super().__post_init__()
        check_budget(self, "contextual", optional=True, minimum=0)
        contextual = self.contextual
        if contextual is not None and comparable(contextual, self.budget) and contextual >= self.budget:
            self.fail("contextual", f"must lie below budget = {self.budget}")

    def split(self, keep: int, num_visual: int) -> tuple[int, int]:
        """(dominant, contextual) of `keep` resolved tokens on an image of `num_visual`."""
        if self.contextual is None:
            return visionzip_split(keep)
        contextual = budget_count(self, "contextual", num_visual)
        if contextual >= keep:
            self.fail("contextual", f"resolves to {contextual} of {num_visual} visual tokens, not below the budget's "
                                    f"{keep}")  # fmt: skip
        return keep - contextual, contextual

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        stages = super().resolve_stages(num_layers, num_visual)
        self.split(stages[0].keep, num_visual)  # refuses a contextual count the budget cannot hold
        return stages

    def select(self, ctx: PruneContext) -> torch.Tensor:
        dominant, contextual = self.split(ctx.stage.keep, ctx.layout.num_visual)
        ctx.scores = ctx.vision.cls_attention().sum(dim=1)  # (B, V), summed over heads as the repository
        ctx.details.update(dominant=dominant, contextual=contextual)
        return torch.topk(ctx.scores, dominant, dim=-1).indices

    def recycle(self, ctx: PruneContext, kept: torch.Tensor):
        contextual = self.split(ctx.stage.keep, ctx.layout.num_visual)[1]
        if contextual == 0:
            return None
        num_visual = ctx.scores.shape[1]
        others = first_true_columns(torch.ones_like(ctx.scores, dtype=torch.bool).scatter(1, kept, False),
                                    num_visual - kept.shape[1])  # (B, R) non-dominant tokens, image order  # fmt: skip
        targets, merged = merge_contextual(
            gather_tokens(ctx.vision.features, others), gather_tokens(ctx.vision.visual_keys(), others), contextual
        )
        return others[:, targets], ctx.vision.project(merged)
