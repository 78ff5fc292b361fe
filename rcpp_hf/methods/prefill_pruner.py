"""Prefill pruners: methods that physically drop visual tokens between decoder layers while the prompt runs
(FastV, SparseVLM, PDrop, HiMAP, ...), and the vision-side ones that choose before layer 0 from what the vision
tower computed (VisPruner, CDPruner, VisionZip, ...). The mechanism is the engine's (`engine/pruning.py`,
`PrefillPruningTap`); a pruner writes its stages and its `score`. Kept entries keep their original positions unless
the pruner's `stage_positions` gives them new ones (PDrop's `positions="renumbered"`).

A `VisionPruner` is a `PrefillPruner` with one stage at layer 0: it drops visual entries of the language model's
input embeddings before any decoder layer runs, so prefill and the KV cache shrink from the first layer on. Kept
entries keep their original positions: the language model was trained with the image's tokens at those positions,
and the text after the image keeps the positions it would have had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import PositionShiftTap, PrefillPruningTap, PruneContext, PruneStage, check_stages
from rcpp_hf.engine.vision import feature_attention_layer
from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.methods.budget import budget_count, check_budget, published_fraction
from rcpp_hf.methods.protocol import GenerateContext, MethodState


class PrefillPruner(MethodConfig):
    """A method that drops visual tokens between decoder layers during prefill. Subclasses are dataclasses that
    implement `resolve_stages` and `score`; `select` (top-k of the score) may be overridden."""

    kind = "prefill_pruner"
    ragged_rows: ClassVar[bool] = True  # each row's stages resolve on its own image (engine/pruning.py)
    # True: `stage.keep` is an upper bound and `select` decides how many stay (the same count in every row), so a
    # stage runs even when it may keep every token (e.g. the GAN pruner's learned masks).
    selects_count: ClassVar[bool] = False

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        """The stages on a decoder of `num_layers` layers for an image of `num_visual` tokens, layers increasing and
        keep counts not increasing. Raises ValueError naming the setting that does not fit."""
        raise NotImplementedError

    def attention_layer(self, stage: PruneStage) -> int | None:
        """The layer whose attention `score` reads at `stage` (None: it reads none)."""
        return stage.layer - 1

    def check_fits(self, num_layers: int, num_visual: int) -> None:
        """The stages resolve and fit the model, as `PrefillPruningTap` checks them."""
        stages = self.resolve_stages(num_layers, num_visual)
        check_stages(stages, num_layers, num_visual, self.name, {s.layer: self.attention_layer(s) for s in stages})

    def score(self, ctx: PruneContext) -> torch.Tensor:
        """Importance of each visual entry of `ctx.layout` -> (B, Vl), higher is kept."""
        raise NotImplementedError

    def select(self, ctx: PruneContext) -> torch.Tensor:
        """Visual columns (B, keep) to keep: the top `keep` by `score` (ties to the lower index)."""
        ctx.scores = self.score(ctx).float()
        return torch.topk(ctx.scores, ctx.stage.keep, dim=-1, sorted=False).indices

    def recycle(self, ctx: PruneContext, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optionally keep some dropped tokens with new hidden states (e.g. SparseVLM's merged tokens): visual
        columns (B, c) not in `kept` and their states (B, c, D); None keeps only `kept`."""
        return None

    def stage_positions(self, layout: TokenLayout) -> torch.Tensor | None:
        """The positions (B, k) the entries a stage kept run at from its layer on (`layout`: those entries, at the
        positions they had); None (the default) keeps theirs. When a pruner moves them, decoded tokens follow the last
        prompt entry as each layer numbers it (`engine.pruning.PositionShiftTap`)."""
        return None

    @property
    def moves_positions(self) -> bool:
        """Whether `stage_positions` may move positions (the state then adds the decode tap that follows them)."""
        return False

    def start(self, ctx: GenerateContext) -> "PrefillPruningState":
        return PrefillPruningState(self, ctx)


@dataclass
class VisionPruner(PrefillPruner):
    """A prefill pruner that reads the vision tower and keeps `budget` visual tokens before layer 0.

    Args:
        budget: T, visual tokens kept, merged ones included: a budget (a count of this model's image or a fraction
            of it, `methods/budget.py`). Default 64 / 576 (the repositories' smallest published setting, 64 of
            LLaVA-1.5's 576; their 128 / 192 are 0.2222 / 0.3333). `stage.keep` holds it resolved.
        vision_layer: the vision encoder layer whose attention is read (0-based; negative counts from the end);
            None: the layer that produces LLaVA's `vision_feature_layer` (the official repositories' choice).
    """

    reads_vision: ClassVar[bool] = True
    ragged_rows: ClassVar[bool] = False  # the vision record holds one image size
    budget: int | float = published_fraction(64)
    vision_layer: int | None = None

    def __post_init__(self):
        check_budget(self, "budget")
        if self.vision_layer is not None and not isinstance(self.vision_layer, int):
            self.fail("vision_layer", "must be None or an integer (a vision encoder layer)")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        return [PruneStage(layer=0, keep=budget_count(self, "budget", num_visual))]

    def attention_layer(self, stage: PruneStage) -> int | None:
        return None  # it reads the vision tower, recorded in `PruneContext.vision`

    def resolve_vision_layer(self, num_layers: int, feature_layer: int) -> int:
        """The encoder layer read, in [0, num_layers), on a tower of `num_layers` layers whose features LLaVA takes
        from `hidden_states[feature_layer]`."""
        if self.vision_layer is None:
            return feature_attention_layer(feature_layer, num_layers)
        if not -num_layers <= self.vision_layer < num_layers:
            self.fail("vision_layer", f"is out of range for a vision tower of {num_layers} layers "
                                      f"(valid: {-num_layers}..{num_layers - 1})")  # fmt: skip
        return self.vision_layer % num_layers


class PrefillPruningState(MethodState):
    """A prefill pruner in one `generate` call: its tap runs the stages inside the prompt's forward (the images are
    encoded here, with the vision tower recorded, for a pruner that `reads_vision`)."""

    def __init__(self, pruner: PrefillPruner, ctx: GenerateContext):
        vision = None
        if pruner.reads_vision:
            ctx.encoded, vision = ctx.family.encode_images_recorded(ctx.input_ids, ctx.model_kwargs, pruner)
        self.tap = PrefillPruningTap(pruner, ctx.language_model, ctx.visual_counts, vision)
        self.prefill_taps = [self.tap]
        self.decode_taps = [PositionShiftTap(self.tap)] if pruner.moves_positions else []

    def outputs(self) -> dict:
        return {"pruning": list(self.tap.records)}
