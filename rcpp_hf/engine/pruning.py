"""Prefill pruning: visual tokens physically dropped between decoder layers, the one mechanism every language-model
pruner uses (FastV, FastV + FinePruner, SparseVLM, PDrop, ...).

A pruner (`methods.prefill_pruner.PrefillPruner`) names its stages (`resolve_stages`: before which layer, how many
visual tokens stay) and writes only `score` (kvpress's ScorerPress pattern); `PrefillPruningTap` runs the stages
inside `run_decoder`: it keeps the top-scoring visual tokens and every text token, in order. From the stage's layer on the
hidden states hold only the kept entries (compute really saved), they keep their original positions, and the layer
caches only them; decoding then attends, per layer, to what that layer cached.

A pruner may instead give the kept entries new positions at a stage (`stage_positions`, e.g. PyramidDrop's official
code renumbers them consecutively). Decoded tokens then continue after the last prompt entry as each layer numbers
it: `PositionShiftTap` moves a decoded token's position, at each such stage's layer, by as much as the stage moved
the last prompt entry.

Layer defaults of the methods are stated for LLaVA-1.5-7B's 32-layer decoder; on other models they scale by depth
fraction (`scale_layer`). Token budgets are counts of the model's image or fractions of it (`methods/budget.py`);
the stages here hold them resolved. `out.pruning` reports what was resolved and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rcpp_hf.engine.attention import LayerAttention
from rcpp_hf.engine.decoder import DecoderTap, take_entries
from rcpp_hf.engine.layout import TokenLayout, first_true_columns

if TYPE_CHECKING:
    from rcpp_hf.engine.vision import VisionRecord

REFERENCE_LAYERS = 32  # LLaVA-1.5-7B's decoder depth, the scale of every method's published layer defaults
REFERENCE_VISUAL_TOKENS = 576  # LLaVA-1.5's 24 x 24 patches, the scale of every published token budget

# The two ways a command-line flag takes layers; each layer flag's help says which (a test reads every parser).
OWN_LAYERS = "layer indices of this model's own decoder"
SCALED_LAYERS = f"layer indices of a {REFERENCE_LAYERS}-layer decoder (LLaVA-1.5-7B's), scaled to this model's depth"
# And heads: a head flag's help says whose heads it counts.
OWN_HEADS = "head counts of this model's own attention heads"
NOT_THE_MODELS_HEADS = "not the model's attention heads"


def scale_layer(layer: int, num_layers: int) -> int:
    """A layer index stated for a 32-layer decoder, at the same depth fraction of a `num_layers` decoder, kept in
    [1, num_layers - 1] so that a stage always has a layer before it and one to prune."""
    return min(max(round(layer * num_layers / REFERENCE_LAYERS), 1), num_layers - 1)


def scale_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Several stage layers scaled by `scale_layer`, then pushed apart so that they stay strictly increasing on a
    shallow decoder (e.g. (8, 16, 24) -> (1, 2, 3) on 4 layers). Raises when they cannot fit."""
    scaled = []
    for layer in layers:
        layer = scale_layer(layer, num_layers)
        scaled.append(max(layer, scaled[-1] + 1) if scaled else layer)
    if scaled[-1] > num_layers - 1:
        raise ValueError(f"{len(layers)} pruning stages do not fit a decoder with {num_layers} layers")
    return tuple(scaled)


def equivalent_keep(budget: int, num_visual: int, layer: int, num_layers: int) -> int:
    """Tokens kept from `layer` on so that the average number of visual tokens over all layers equals `budget`
    (FinePruner's `R_dict`: (K * 576 + (32 - K) * R) / 32 = budget, e.g. 7B at K = 2: 192 -> 166, 128 -> 98,
    64 -> 30)."""
    return max(1, round((budget * num_layers - layer * num_visual) / (num_layers - layer)))


def visual_tokens_per_layer(kept_from: dict[int, int], num_layers: int, num_visual: int) -> list[int]:
    """Visual tokens each decoder layer computes: `num_visual` up to the first stage, then `kept_from[layer]` from
    each stage's layer on ({layer: kept}, from `PruneStage`s or `PruneRecord`s)."""
    per_layer, visual = [], num_visual
    for layer in range(num_layers):
        visual = kept_from.get(layer, visual)
        per_layer.append(visual)
    return per_layer


@dataclass(frozen=True)
class PruneStage:
    """Before decoder layer `layer` runs, keep `keep` visual tokens per row (from then on, until the next stage)."""

    layer: int
    keep: int


@dataclass
class PruneRecord:
    """What one stage did: its layer, the visual tokens it kept per row, and method-specific facts (e.g. heads).

    Rows whose images differ in size keep different counts: `kept` is then the most a row kept, `kept_per_row`
    each row's, and `kept_visual_ids` is padded with -1 after a row's own; `details` holds each row's facts under
    "rows"."""

    layer: int
    kept: int
    kept_visual_ids: torch.Tensor  # (B, keep) indices of the kept visual tokens among the image tokens (0..V-1)
    details: dict = field(default_factory=dict)
    kept_per_row: tuple[int, ...] | None = None  # None: every row kept `kept`


@dataclass
class PruneContext:
    """What a pruner sees at a stage.

    Attributes:
        stage: the stage being applied.
        hidden: (B, S, D) hidden states entering `stage.layer`.
        layout: their entries; visual entries at `layout.visual_slots` (B, Vl), the order `score` returns.
        attention: the recorded attention of the layer the pruner asked for (default `stage.layer - 1`), or None.
        language_model: the decoder, for pruners that recompute attention with a layer's own projections.
        inputs_embeds: (B, S0, D) the decoder's input, laid out as `prompt_layout` (the unpruned prompt).
        scores: (B, Vl) what `score` returned, once `select` ran.
        details: facts the pruner wants reported in `PruneRecord.details`.
        vision: what the vision tower recorded, for pruners that read it (`reads_vision`), else None.
    """

    stage: PruneStage
    hidden: torch.Tensor
    layout: TokenLayout
    attention: LayerAttention | None
    language_model: torch.nn.Module
    inputs_embeds: torch.Tensor | None = None
    prompt_layout: TokenLayout | None = None
    scores: torch.Tensor | None = None
    details: dict = field(default_factory=dict)
    vision: VisionRecord | None = None

    def last_prompt_rows(self) -> torch.Tensor:
        """(B, 1) index of the last prompt entry (prompts are left-padded, so it is the last column)."""
        batch = self.hidden.shape[0]
        return torch.full((batch, 1), self.layout.seq_len - 1, dtype=torch.long, device=self.hidden.device)

    def causal_key_mask(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, q) query rows -> (B, q, S) bool: each row sees the non-padding entries up to itself."""
        entries = torch.arange(self.layout.seq_len, device=rows.device)
        return (entries[None, None, :] <= rows[:, :, None]) & self.layout.valid[:, None, :]

    def attention_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Recorded attention of query rows `rows` (B, q) over all entries, causal -> (B, H, q, S) float32."""
        return self.attention.probs(rows, self.causal_key_mask(rows))

    def position_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, S, d), for the current entries, as the decoder computes them."""
        return self.language_model.rotary_emb(self.hidden, position_ids=self.layout.rope_positions)

    def visual_columns(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Select the visual entries of the last dimension: (..., S) -> (..., Vl), batch first."""
        slots = self.layout.visual_slots
        index = slots.view(slots.shape[0], *([1] * (per_entry.dim() - 2)), slots.shape[1])
        return per_entry.gather(-1, index.expand(*per_entry.shape[:-1], slots.shape[1]))


def check_stages(
    stages: list[PruneStage], num_layers: int, num_visual: int, method: str, read_layers: dict | None = None
) -> None:
    """Stages must fit the model: layers in [0, num_layers - 1], increasing; keeps in [1, num_visual], not
    increasing; a stage that reads a layer's attention (`read_layers`: stage layer -> read layer or None) comes
    after that layer, so only a stage that reads none (e.g. a vision-side pruner) may act before layer 0."""
    previous_layer, previous_keep = -1, num_visual
    for stage in stages:
        if not 0 <= stage.layer < num_layers:
            raise ValueError(
                f"{method}: pruning before layer {stage.layer} does not fit a decoder with {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )
        read = (read_layers or {}).get(stage.layer)
        if read is not None and not 0 <= read < stage.layer:
            raise ValueError(
                f"{method}: the stage before layer {stage.layer} reads the attention of layer {read}, which has not "
                f"run yet (valid: 0..{stage.layer - 1})"
            )
        if stage.layer <= previous_layer:
            raise ValueError(f"{method}: stage layers must increase, got {[s.layer for s in stages]}")
        if not 1 <= stage.keep <= previous_keep:
            raise ValueError(
                f"{method}: a stage keeps {stage.keep} visual tokens; it must lie in [1, {previous_keep}] (the image "
                f"has {num_visual} tokens, and a stage cannot keep more than the one before)"
            )
        previous_layer, previous_keep = stage.layer, stage.keep


class PrefillPruningTap(DecoderTap):
    """Runs a prefill pruner's stages inside the prefill forward; `records` holds one `PruneRecord` per stage.

    `pruner` is a `methods.prefill_pruner.PrefillPruner`: the tap calls its `resolve_stages`, `attention_layer`,
    `select`, `recycle` and `stage_positions` and reads `name` and `selects_count`. `position_shifts` holds, per
    stage layer whose pruner moved positions, how far the last prompt entry moved (B, 1), for `PositionShiftTap`.

    `num_visual` is V, or one V per row when the rows' images differ in size. Each row's stages are then resolved on
    its own image (a fraction keeps that share of each row's tokens, a count that many of each row's), at the same
    layers, and each stage selects row by row, as each row alone would; rows that keep fewer entries are
    left-padded (`TokenLayout.take_rows`).
    """

    def __init__(
        self,
        pruner,
        language_model: torch.nn.Module,
        num_visual: int | tuple[int, ...],
        vision: VisionRecord | None = None,
    ):
        num_layers = language_model.config.num_hidden_layers
        self.pruner = pruner
        self.language_model = language_model
        self.vision = vision
        counts = (num_visual,) if isinstance(num_visual, int) else tuple(num_visual)
        resolved = {count: pruner.resolve_stages(num_layers, count) for count in sorted(set(counts))}
        for count, stages in resolved.items():
            read_layers = {stage.layer: pruner.attention_layer(stage) for stage in stages}
            # Checked before keying by layer, where two stages on one layer would silently merge.
            check_stages(stages, num_layers, count, pruner.name, read_layers)
        if len({tuple(stage.layer for stage in stages) for stages in resolved.values()}) > 1:
            raise ValueError(
                f"{pruner.name}: its stage layers depend on the image's size, and the batch rows' images differ "
                f"({sorted(resolved)} visual tokens); batch images of one size, or generate the rows separately"
            )
        stages = resolved[counts[0]]
        self.read_layers = {stage.layer: pruner.attention_layer(stage) for stage in stages}
        self.stages = {stage.layer: stage for stage in stages}
        # Ragged rows: each row's own stages, by layer.
        self.row_stages = None if len(resolved) == 1 else [
            {stage.layer: stage for stage in resolved[count]} for count in counts]  # fmt: skip
        if self.row_stages is not None and vision is not None:
            raise ValueError(f"{pruner.name} reads the vision tower, recorded for rows of one image size; got "
                             f"images of {sorted(resolved)} visual tokens")  # fmt: skip
        self.attention_layers = frozenset(layer for layer in self.read_layers.values() if layer is not None)
        self.attention: dict[int, LayerAttention] = {}
        self.inputs_embeds: torch.Tensor | None = None  # the decoder's input and its layout, seen before layer 0
        self.prompt_layout: TokenLayout | None = None
        self.records: list[PruneRecord] = []
        self.position_shifts: dict[int, torch.Tensor] = {}

    def after_layer(self, layer_idx, hidden, past, layout, attention) -> None:
        if attention is not None and past is None:
            self.attention[layer_idx] = attention

    def before_layer(self, layer_idx, hidden, layout):
        if layer_idx == 0:
            self.inputs_embeds, self.prompt_layout = hidden, layout
        stage = self.stages.get(layer_idx)
        if stage is not None and self.row_stages is not None:
            return self.prune_rows(layer_idx, hidden, layout)
        if stage is None or (layout.num_visual <= stage.keep and not self.pruner.selects_count):
            return None
        ctx = PruneContext(
            stage, hidden, layout, self.attention.get(self.read_layers[layer_idx]), self.language_model,
            self.inputs_embeds, self.prompt_layout, vision=self.vision,
        )  # fmt: skip
        columns = self.pruner.select(ctx)
        recycled = self.pruner.recycle(ctx, columns)
        if recycled is not None:
            columns = torch.cat([columns, recycled[0]], dim=1)
        columns = torch.sort(columns, dim=1).values
        slots = layout.visual_slots.gather(1, columns)
        if recycled is not None:
            hidden = hidden.scatter(1, layout.visual_slots.gather(1, recycled[0])[:, :, None].expand_as(recycled[1]),
                                    recycled[1].to(hidden.dtype))  # fmt: skip
        keep_entry = (layout.visual_ids < 0).scatter(1, slots, True)
        kept = first_true_columns(keep_entry, int(keep_entry[0].sum()))
        hidden, layout = take_entries(hidden, layout, kept)
        positions = self.pruner.stage_positions(layout)
        if positions is not None:
            # The prompt's last entry is its last column (left padding); decoded tokens follow it.
            self.position_shifts[layer_idx] = layout.positions[:, -1:] - positions[:, -1:]
            layout = layout.with_positions(positions)
        self.records.append(PruneRecord(layer_idx, columns.shape[1], layout.visual_token_ids, ctx.details))
        return hidden, layout

    def prune_rows(self, layer_idx: int, hidden: torch.Tensor, layout: TokenLayout):
        """A stage on rows whose images differ in size: each row's own stage selects on that row alone (the pruner
        sees a batch of one), then the rows keep their text and their selected visual entries, left-padded."""
        attention = self.attention.get(self.read_layers[layer_idx])
        keep_entry = layout.visual_ids < 0
        rows, details = [], []
        for row in range(hidden.shape[0]):
            stage, row_layout, row_hidden = self.row_stages[row][layer_idx], layout.row(row), hidden[row : row + 1]
            if row_layout.num_visual <= stage.keep and not self.pruner.selects_count:
                keep_entry[row] |= row_layout.visual_ids[0] >= 0
                rows.append(row_hidden)
                details.append({})
                continue
            ctx = PruneContext(
                stage, row_hidden, row_layout, None if attention is None else attention.row(row),
                self.language_model, self.inputs_embeds[row : row + 1], self.prompt_layout.row(row),
            )  # fmt: skip
            columns = self.pruner.select(ctx)
            recycled = self.pruner.recycle(ctx, columns)
            if recycled is not None:
                columns = torch.cat([columns, recycled[0]], dim=1)
                recycled_slots = row_layout.visual_slots.gather(1, recycled[0])[:, :, None].expand_as(recycled[1])
                row_hidden = row_hidden.scatter(1, recycled_slots, recycled[1].to(hidden.dtype))
            keep_entry[row, row_layout.visual_slots.gather(1, columns)[0]] = True
            rows.append(row_hidden)
            details.append(ctx.details)
        hidden, (layout, index) = torch.cat(rows, dim=0), layout.take_rows(keep_entry)
        hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
        positions = self.pruner.stage_positions(layout)
        if positions is not None:
            self.position_shifts[layer_idx] = layout.positions[:, -1:] - positions[:, -1:]
            layout = layout.with_positions(positions)
        self.records.append(PruneRecord(layer_idx, layout.num_visual, layout.visual_token_ids, {"rows": details},
                                        kept_per_row=layout.visual_counts))  # fmt: skip
        return hidden, layout


class PositionShiftTap(DecoderTap):
    """At decode, for a pruner whose stages moved positions: before each such stage's layer, the query rows move by
    the shift `PrefillPruningTap.position_shifts` recorded there (positions - shift), so that a decoded token sits
    right after the prompt as that layer numbers it; layers keep the moved positions until the next such stage."""

    def __init__(self, prefill_tap: PrefillPruningTap):
        self.shifts = prefill_tap.position_shifts  # filled during the prefill

    def before_layer(self, layer_idx, hidden, layout):
        shift = self.shifts.get(layer_idx)
        return None if shift is None else (hidden, layout.with_positions(layout.positions - shift))
