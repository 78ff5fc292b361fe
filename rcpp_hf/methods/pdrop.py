"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction"): the ranking maths, as pure batched functions.

Source: Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py` (`LlamaModel.pdrop_forward`,
`LlamaModel.pdrop_rank_drop`), `llava/model/llava_arch.py` (`prepare_inputs_labels_for_multimodal_pdrop`) and the
README / `scripts/v1_5/pdrop_eval` settings.

How the pieces fit (LLaVA-1.5-7B, 32 layers): after the output of layer `l - 1` for each l in `PDROP_LAYERS`, the
visual tokens are ranked by `light_attention` computed with layer l's own input_layernorm, q_proj, k_proj and RoPE,
with the last instruction token as the only query; the top `pdrop_keep_counts(...)[stage]` survive, and layer l is the
first to run on the reduced sequence.

Positions (`PDrop.positions`): "original" keeps every kept entry at its original position, as every pruner of the
library does; "renumbered" follows the repository, which after each drop renumbers the kept entries 0, 1, ...
(`renumbered_positions`) and, at decode, lowers a generated token's position at each stage layer by the tokens that
stage dropped, so that it follows the prompt as that layer numbers it (`engine.pruning.PositionShiftTap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.attention import attention_probs, probe_query, prompt_keys
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import PruneContext, PruneStage, scale_layers
from rcpp_hf.methods.budget import budget_count, check_budget, unreachable
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

# Layer l ranks and is the first layer to see the reduced set: `rank_layer = layer_idx + 1` in `pdrop_forward`,
# i.e. the drop happens after (0-based) layers 7, 15 and 23. README: `--layer_list '[8,16,24]'`.
PDROP_LAYERS = (8, 16, 24)
# Fractions of the image's *original* visual tokens kept from each stage on (not of the previous stage's count);
# README: `--image_token_ratio_list "[0.5,0.25,0.125]"` (lambda = 0.5).
PDROP_RATIOS = (0.5, 0.25, 0.125)
# How kept entries are positioned after a drop: "original" (the library's rule for every pruner) or "renumbered"
# (the repository's `pdrop_rank_drop` / `pdrop_forward`, see `renumbered_positions`).
PDROP_POSITIONS = ("original", "renumbered")
# With a budget, the stages start earlier: the published layers cannot reach 128 or 64 of 576 (the 8 layers before
# layer 8 alone average 144). The repository publishes no layers for the 192 / 128 / 64 budgets of its paper; this
# choice (FastV's layer 2, then evenly spaced) is ours, and the same for every budget, so that budgets compare.
PDROP_BUDGET_LAYERS = (2, 12, 22)


def pdrop_keep_counts(num_visual: int, ratios: tuple[float, ...] = PDROP_RATIOS) -> tuple[int, ...]:
    """Visual tokens kept from each stage on: `int(num_visual * ratio)` (truncated, as `pdrop_rank_drop`'s
    `keep_length`), e.g. 576 -> (288, 144, 72)."""
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    if any(not 0.0 < r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
        raise ValueError(f"ratios must be non-increasing fractions in (0, 1], got {ratios}")
    counts = tuple(int(num_visual * r) for r in ratios)
    if counts[-1] < 1:
        raise ValueError(f"ratios keep no visual token of {num_visual} at the last stage: {ratios}")
    return counts


def last_instruction_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The query PDrop ranks with: the last token of each row's prompt.

    In inference `pdrop_rank_drop` uses row position `prompt_len + image_tokens - 1` of the unpadded sequence, i.e.
    the prompt's last token (the end of "ASSISTANT:"); in training it is the token before the answer, the same token.
    Here: the index of the last non-padding entry, which is the last column for every left-padded row.

    Args:
        attention_mask: (batch, S) 0/1 or bool, 1 on real tokens.
    Returns:
        (batch,) long.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, S), got {tuple(attention_mask.shape)}")
    valid = attention_mask.bool()
    if not valid.any(dim=1).all():
        raise ValueError("attention_mask must mark at least one token in every row")
    positions = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return positions.masked_fill(~valid, -1).max(dim=1).values


def light_attention(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor,
) -> torch.Tensor:
    """PyramidDrop's ranking attention (`pdrop_rank_drop`): one query row, recomputed with the next layer's weights.

    The hidden states entering `layer` go through its input_layernorm, q_proj (only the query row) and k_proj,
    RoPE is applied, and the row's probabilities softmax(q k^T * scaling) over the keys it may see (key_valid, and
    causal: keys at or before the query) are averaged over the heads. The caller slices the visual keys out of the
    result; they are not renormalised, as in the repository. Grouped-query heads share their kv head (no repeat).

    Args:
        layer: the decoder layer that will run next (a transformers LlamaDecoderLayer).
        hidden_states: (batch, S, D) its input.
        position_embeddings: (cos, sin), each (batch, S, head_dim), as the model's rotary_emb returns for the rows'
            position ids.
        query_index: (batch,) the query's index along S (`last_instruction_index`).
        key_valid: (batch, S) bool, False on padding.
    Returns:
        (batch, S) float32 head-mean probabilities; 0 on masked keys.
    """
    batch, seq, _ = hidden_states.shape
    cos, sin = position_embeddings
    if cos.shape[:2] != (batch, seq) or sin.shape != cos.shape:
        raise ValueError(f"position_embeddings must be two (batch, S, head_dim) tensors, got {tuple(cos.shape)}")
    if query_index.shape != (batch,) or query_index.dtype != torch.long:
        raise ValueError(
            f"query_index must be a (batch,) long tensor, got {query_index.dtype} {tuple(query_index.shape)}"
        )
    if ((query_index < 0) | (query_index >= seq)).any():
        raise ValueError(f"query_index must lie in [0, {seq}), got {query_index.tolist()}")
    if key_valid.dtype != torch.bool or key_valid.shape != (batch, seq):
        raise ValueError(f"key_valid must be a (batch, S) bool tensor, got {key_valid.dtype} {tuple(key_valid.shape)}")
    rows = torch.arange(batch, device=hidden_states.device)
    if not key_valid[rows, query_index].all():
        raise ValueError("query_index must point at a valid key (the query sees itself)")
    # The query row and all keys, with the layer's own norm, projections and RoPE (engine.attention).
    cos_row, sin_row = cos[rows, query_index][:, None], sin[rows, query_index][:, None]
    query = probe_query(layer, hidden_states[rows, query_index][:, None], cos_row, sin_row)
    key = prompt_keys(layer, hidden_states, cos, sin)  # (batch, H_kv, S, d)
    causal = torch.arange(seq, device=hidden_states.device)[None, :] <= query_index[:, None]
    key_mask = (key_valid & causal)[:, None, :]
    return attention_probs(query, key, layer.self_attn.scaling, key_mask).mean(dim=1)[:, 0]


def renumbered_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The repository's positions after a drop: each row's real entries numbered 0, 1, ... in order.

    `pdrop_rank_drop` rebuilds `position_ids[i, :cur_len] = arange(cur_len)` over the kept (unpadded) sequence, and
    the next stage's light attention and every later layer use them. At decode, `pdrop_forward` subtracts at each
    stage layer the visual tokens that stage dropped (`cur_visual_length - next_visual_length`) from the generated
    token's position, i.e. the token follows the renumbered prompt; the engine's `PositionShiftTap` does the same.
    Padding entries (left padding here; the repository pads on the right) keep their positions, which nothing reads.

    Args:
        positions: (B, k) the kept entries' positions so far.
        valid: (B, k) bool, False on padding.
    Returns:
        (B, k) long.
    """
    if positions.shape != valid.shape or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor shaped like positions {tuple(positions.shape)}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")  # fmt: skip
    return torch.where(valid, valid.long().cumsum(dim=1) - 1, positions)


# -- the method, on the engine's prefill pruning ----------------------------------------------------------------------
def average_keep_fraction(ratio: float, stage_layers: tuple[int, ...], num_layers: int) -> float:
    """Average fraction of the visual tokens per layer when stage s keeps ratio^(s+1) of them from its layer on."""
    bounds = [0, *stage_layers, num_layers]
    return sum((bounds[s + 1] - bounds[s]) * ratio**s for s in range(len(bounds) - 1)) / num_layers


def ratio_for_budget(fraction: float, stage_layers: tuple[int, ...], num_layers: int) -> float:
    """The geometric stage ratio lambda whose average keep fraction is `fraction`, by bisection (it is increasing in
    lambda). PyramidDrop reaches its 192 / 128 / 64 budgets by changing lambda."""
    low, high = 0.0, 1.0
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if average_keep_fraction(mid, stage_layers, num_layers) < fraction else (low, mid)
    return (low + high) / 2


@register_method
@dataclass
class PDrop(PrefillPruner):
    """PyramidDrop on the engine: at each stage layer, the layer's own light attention of the last prompt token ranks
    the visual tokens and the top fraction survives.

    Args:
        budget: average visual tokens per layer, a budget (a count of this model's image or a fraction of it,
            `methods/budget.py`; the paper's 192 / 128 / 64 of 576 are 0.3333 / 0.2222 / 0.1111); the stage ratio
            lambda (kept fractions lambda, lambda^2, lambda^3) is solved for it. None: the published ratios `ratios`.
        ratios: kept fraction of the image's tokens from each stage on, non-increasing (default 0.5 / 0.25 / 0.125).
        layers: the stage layers, this model's layer indices (each is the first layer to run pruned); None: (8, 16,
            24) of 32 with `ratios`, or
            `PDROP_BUDGET_LAYERS` (2, 12, 22) with a budget, scaled by depth.
        positions: "original" (default: kept entries keep their original positions, as for every pruner here) or
            "renumbered" (the repository: renumbered consecutively after each drop, decoded tokens following them).
    """

    name = "pdrop"
    budget: int | float | None = None
    ratios: tuple[float, ...] = PDROP_RATIOS
    layers: tuple[int, ...] | None = None
    positions: str = "original"

    CONTRACT_NEUTRAL = {"ratios": (1.0, 1.0, 1.0)}
    CONTRACT_INVALID = {"budget": 0, "ratios": (0.25, 0.5, 0.125), "positions": "compact"}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        self.ratios = tuple(self.ratios)
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        check_budget(self, "budget", optional=True)
        if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios) or list(self.ratios) != sorted(
            self.ratios, reverse=True
        ):
            self.fail("ratios", "must be non-increasing fractions in (0, 1]")
        if self.layers is not None and (list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1):
            self.fail("layers", "must be None or increasing layer indices >= 1")
        if self.layers is not None and len(self.layers) != len(self.ratios):
            self.fail("layers", f"needs one layer per ratio ({len(self.ratios)})")
        if self.positions not in PDROP_POSITIONS:
            self.fail("positions", f"must be one of {PDROP_POSITIONS}")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        default_layers = PDROP_LAYERS if self.budget is None else PDROP_BUDGET_LAYERS
        stage_layers = self.layers if self.layers is not None else scale_layers(default_layers, num_layers)
        if self.budget is not None:
            budget = budget_count(self, "budget", num_visual)
            # The average tends to the unpruned layers' share as lambda -> 0 and never reaches it.
            lowest = stage_layers[0] * num_visual // num_layers + 1
            if budget < lowest:
                self.fail("budget", unreachable(self.budget, num_visual, stage_layers[0], num_layers, lowest))
            ratio = ratio_for_budget(budget / num_visual, stage_layers, num_layers)
            keeps = tuple(max(1, round(num_visual * ratio ** (s + 1))) for s in range(len(stage_layers)))
        else:
            keeps = pdrop_keep_counts(num_visual, self.ratios)
        return [PruneStage(layer, keep) for layer, keep in zip(stage_layers, keeps)]

    def attention_layer(self, stage: PruneStage) -> None:
        return None  # it recomputes its own light attention with the stage layer's projections

    def score(self, ctx: PruneContext) -> torch.Tensor:
        layer = ctx.language_model.layers[ctx.stage.layer]
        query = last_instruction_index(ctx.layout.valid)
        probs = light_attention(layer, ctx.hidden, ctx.position_embeddings(), query, ctx.layout.valid)
        return ctx.visual_columns(probs)

    @property
    def moves_positions(self) -> bool:
        return self.positions == "renumbered"

    def stage_positions(self, layout: TokenLayout) -> torch.Tensor | None:
        return renumbered_positions(layout.positions, layout.valid) if self.moves_positions else None
