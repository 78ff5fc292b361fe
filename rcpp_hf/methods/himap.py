"""HiMAP (Zhang et al., "Unraveling the Shift of Visual Information Flow in MLLMs: From Phased Interaction to
Efficient Inference"; ustc-hyin/HiMAP, `src/LLaVA/llava/model/language_model/himap.py`, `Himap_LlamaModel.forward`),
with the option of condensing instead of cutting (YangXu-03/Himap-based; `rcpp_hf.engine.condensation`).

Two prefill stages (LLaVA-1.5-7B, 32 layers, 576 visual tokens; the repository's script):
  - before the text layer K1 = 2: the image tokens ranked by the attention the text after the image gives them at
    layer K1 - 1 (head mean, summed over every text query row after the image); the top R1 = 288 survive;
  - before the image layer K2 = 8: the survivors ranked by the image-to-image attention of layer K2 - 1 (head mean,
    summed over the visual query rows: column sums of the image block); the top R2 = 72 survive.
Layers scale by depth (`scale_layers`); ranks are budgets (`methods/budget.py`), by default the published counts as
fractions of the image (288 / 576 = 0.5, 72 / 576 = 0.125). Unlike the repository (eager
attention, batch row 0, the image span hard-coded by `hmap_v_sys_length` / `hmap_v_img_length`, `use_cache=False`),
the image span comes from `image_token_id` in each row, rows may be left-padded, the attention rows are recomputed
on any attention implementation, and the KV cache keeps only the survivors at their original positions.

With `use_token_condensation`, each stage instead picks its R centroids by feature similarity (FPS or connectivity;
no attention is read) and each centroid's state becomes the cross-attention aggregate of all the stage's visual
tokens, written at the centroid's own entry (original position kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rcpp_hf.engine.attention import normed_states, project_heads
from rcpp_hf.engine.condensation import CONDENSATION_STRATEGIES, FPS_STARTS, condense
from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PruneContext, PruneStage, scale_layer, scale_layers
from rcpp_hf.methods.budget import budget_count, check_budget, comparable, published_fraction
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

HIMAP_LAYERS = (2, 8)  # K1 (text layer), K2 (image layer) of 32: `hmap_v_attn_txt_layer` / `_img_layer`
HIMAP_RANKS = (288, 72)  # R1, R2 of 576: `hmap_v_attn_txt_rank` / `_img_rank`


def text_to_image_scores(attention: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """HiMAP's stage-1 score: attention of the text after the image to each image token, head mean, summed over the
    real query rows. attention (B, H, T, V), real (B, T) bool -> (B, V)."""
    return (attention.mean(dim=1) * real[:, :, None]).sum(dim=1)


def image_to_image_scores(attention: torch.Tensor) -> torch.Tensor:
    """HiMAP's stage-2 score: column sums of the head-mean image-to-image attention. (B, H, V, V) -> (B, V)."""
    return attention.mean(dim=1).sum(dim=1)


@register_method
@dataclass
class HiMAP(PrefillPruner):
    """Args:
        txt_layer, txt_rank: K1, a layer index of this model (None: 2 of 32, scaled by depth), and R1, a budget (a
            count of this model's image or a fraction of it; default 288 / 576 = 0.5).
        img_layer, img_rank: K2 (None: 8 of 32, scaled) and R2 (default 72 / 576 = 0.125), not above R1 once
            resolved.
        image_stage: False runs the text stage alone (the condensation experiment's single condensation layer).
        use_token_condensation: condense at each stage instead of cutting.
        condensation_strategy: "fps" (farthest point sampling) or "connectivity" (top-M by degree).
        condensation_num_heads: heads of the aggregation, equal slices of the layer's key vector (None: its kv heads).
        condensation_temperature: of the cosine logits (see `rcpp_hf.engine.condensation`).
        fps_start: "isolated" (deterministic) or "random" (seeded by `fps_seed` and the stage's layer).

    The repository's config names are accepted by `method_config` / YAML (`SETTING_ALIASES`): `hmap_v_attn_txt_layer` /
    `_txt_rank` / `_img_layer` / `_img_rank` map to the fields above; `hmap_v_sys_length` and `hmap_v_img_length`
    are accepted and ignored, since the image span always comes from `image_token_id`.
    """

    name = "himap"
    SETTING_ALIASES: ClassVar[dict[str, str | None]] = {
        "hmap_v_attn_txt_layer": "txt_layer",
        "hmap_v_attn_txt_rank": "txt_rank",
        "hmap_v_attn_img_layer": "img_layer",
        "hmap_v_attn_img_rank": "img_rank",
        "hmap_v_sys_length": None,
        "hmap_v_img_length": None,
    }
    txt_layer: int | None = None
    txt_rank: int | float = published_fraction(HIMAP_RANKS[0])
    img_layer: int | None = None
    img_rank: int | float = published_fraction(HIMAP_RANKS[1])
    image_stage: bool = True
    use_token_condensation: bool = False
    condensation_strategy: str = "connectivity"
    condensation_num_heads: int | None = None
    condensation_temperature: float = 0.1
    fps_start: str = "isolated"
    fps_seed: int = 0

    CONTRACT_NEUTRAL = {"txt_rank": 16, "img_rank": 16}
    CONTRACT_INVALID = {"txt_layer": 0, "condensation_strategy": "kmeans"}
    CONTRACT_MASKABLE = True  # without token condensation (the default), which gives the centroids new states

    def __post_init__(self):
        for field in ("txt_layer", "img_layer", "condensation_num_heads"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                self.fail(field, "must be None or an integer >= 1")
        check_budget(self, "txt_rank")
        check_budget(self, "img_rank")
        if self.image_stage and comparable(self.txt_rank, self.img_rank) and self.img_rank > self.txt_rank:
            self.fail("img_rank", f"must not exceed txt_rank = {self.txt_rank} (a stage cannot keep more than before)")
        if self.txt_layer is not None and self.img_layer is not None and self.img_layer <= self.txt_layer:
            self.fail("img_layer", f"must come after txt_layer = {self.txt_layer} (stage layers increase)")
        for field in ("image_stage", "use_token_condensation"):
            if not isinstance(getattr(self, field), bool):
                self.fail(field, "must be True or False")
        if self.condensation_strategy not in CONDENSATION_STRATEGIES:
            self.fail("condensation_strategy", f"unknown strategy; known: {CONDENSATION_STRATEGIES}")
        if not (isinstance(self.condensation_temperature, (int, float)) and self.condensation_temperature > 0):
            self.fail("condensation_temperature", "must be a number > 0")
        if self.fps_start not in FPS_STARTS:
            self.fail("fps_start", f"must be one of {FPS_STARTS}")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        if self.txt_layer is None and self.img_layer is None:
            layers = scale_layers(HIMAP_LAYERS, num_layers)
        else:
            layers = tuple(scale_layer(default, num_layers) if layer is None else layer
                           for layer, default in zip((self.txt_layer, self.img_layer), HIMAP_LAYERS))  # fmt: skip
        ranks = [budget_count(self, "txt_rank", num_visual), budget_count(self, "img_rank", num_visual)]
        if self.image_stage and ranks[1] > ranks[0]:
            self.fail("img_rank", f"resolves to {ranks[1]} of {num_visual} visual tokens, more than txt_rank's "
                                  f"{ranks[0]} (a stage cannot keep more than before)")  # fmt: skip
        stages = [PruneStage(layer, rank) for layer, rank in zip(layers, ranks)]
        return stages if self.image_stage else stages[:1]

    def attention_layer(self, stage: PruneStage) -> int | None:
        return None if self.use_token_condensation else stage.layer - 1

    def is_text_stage(self, ctx: PruneContext) -> bool:
        num_layers = ctx.language_model.config.num_hidden_layers
        return ctx.stage == self.resolve_stages(num_layers, ctx.prompt_layout.num_visual)[0]

    def score(self, ctx: PruneContext) -> torch.Tensor:
        if self.is_text_stage(ctx):
            rows, real = text_after_image(ctx.layout)
            return text_to_image_scores(ctx.visual_columns(ctx.attention_rows(rows)), real)
        rows = ctx.layout.visual_slots
        return image_to_image_scores(ctx.visual_columns(ctx.attention_rows(rows)))

    def select(self, ctx: PruneContext) -> torch.Tensor:
        if not self.use_token_condensation:
            return super().select(ctx)
        return ctx.layout.visual_slots[:, :0]  # no token survives as it is: every kept one is condensed (`recycle`)

    def recycle(self, ctx: PruneContext, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.use_token_condensation:
            return None
        layer = ctx.language_model.layers[ctx.stage.layer]
        attention = layer.self_attn
        slots = ctx.layout.visual_slots
        values = ctx.hidden.gather(1, slots[:, :, None].expand(-1, -1, ctx.hidden.shape[-1]))  # (B, V, D)
        keys = project_heads(attention.k_proj, normed_states(layer.input_layernorm, values), attention.head_dim)
        features = keys.transpose(1, 2).flatten(2)  # (B, V, H_kv * d), before RoPE
        heads = self.condensation_num_heads or keys.shape[1]
        generator = torch.Generator().manual_seed(self.fps_seed + ctx.stage.layer)
        centroids, condensed = condense(features, values, ctx.stage.keep, self.condensation_strategy, heads,
                                        self.condensation_temperature, self.fps_start, generator)  # fmt: skip
        ctx.details.setdefault("strategy", self.condensation_strategy)
        return centroids, condensed
