"""The method protocol: what every kind of method does in one `generate` call, and the loop's view of them all.

A method's config (`MethodConfig`, a small validated dataclass) starts, per `generate` call, a `MethodState`: the
method's state for that call with a small per-step interface. `ActiveMethods` holds the states of one call, with
the call's KV cache, and runs the forwards; `RCPPLlavaForConditionalGeneration._sample` is a plain greedy /
sampling loop over it. The kinds (`KINDS`, each in its own file) and the hooks they use:

  kind             file                   its state's hooks
  prefill_pruner   prefill_pruner.py      prefill_taps (drops visual tokens between layers), outputs (PruneRecords)
                                          decode_taps (only a pruner that renumbers positions)
  steering         steering.py            prefill_taps, decode_taps (corrects the residual stream in both phases)
  decoding         rcpp.py (RCPP + DRCD)  prefill_taps, decode_taps, after_prefill, next_token_logits,
                                          record_step, before_decode (schedule, evict, group), outputs (trace)
  contrastive      contrastive_decoder.py after_prefill (its own branch's prompt), next_token_logits (fusion),
                                          after_decode (its branch's step), outputs (its branch's cache)

Per call: every state is started, `prefill` runs the prompt's forward with every state's prefill taps (pruners
first, so that the others see the pruned layers), then per token `next_token_logits` (each state may replace the
logits the token is chosen from), `record_step`, and, unless every row has stopped, `decode`: `before_decode`,
one forward of the chosen token (one query row, or two for DRCD), `after_decode`.

Shapes: B = batch rows, S = prompt length, V = visual tokens of the image, D = hidden size, q = query rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, decode_token, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.families.base import ModelFamily
from rcpp_hf.methods.registry import check_compatible

# The kinds, in the order their taps run inside a forward and their hooks are called.
KINDS = ("prefill_pruner", "steering", "decoding", "contrastive_decoder")


@dataclass
class GenerateContext:
    """What the states of one `generate` call share.

    Attributes:
        family: the model's adapter (`model.family`): the decoder, logits, prompt layout, image encoding.
        generation_config: the call's `RCPPGenerationConfig`.
        input_ids: (B, S) the prompt.
        model_kwargs: what `generate` passes `_sample` (attention_mask, position_ids, pixel_values, ...).
        layout: the prompt's `TokenLayout`.
        num_visual: V (the most of any row, when rows differ).
        visual_counts: V of each row.
        cache: the call's KV cache (the main branch's), filled by the prefill.
        encoded: the images, when a method encoded them (`encode_images_recorded`), for `embed_prompt`.
        embeds: (B, S, D) the decoder's input at prefill (set by `ActiveMethods.prefill`).
        decode_taps: every state's decode taps, in kind order (set once all states started).
    """

    family: ModelFamily
    generation_config: object
    input_ids: torch.LongTensor
    model_kwargs: dict
    layout: TokenLayout
    num_visual: int
    visual_counts: tuple[int, ...]
    cache: VisualKVCache
    encoded: object | None = None
    embeds: torch.Tensor | None = None
    decode_taps: list[DecoderTap] = field(default_factory=list)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.family.language_model


class MethodState:
    """One method's state during one `generate` call. Every hook is optional; the defaults change nothing.

    Attributes:
        prefill_taps: what the method does inside the prompt's forward (`engine.decoder.DecoderTap`s).
        decode_taps: what it does inside every decoding forward.
    """

    prefill_taps: list[DecoderTap] = []
    decode_taps: list[DecoderTap] = []

    def after_prefill(self, ctx: GenerateContext) -> None:
        """Once the prompt's forward has filled `ctx.cache`."""

    def next_token_logits(self, step: int, logits: torch.Tensor, hidden: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The logits step `step`'s token is chosen from (B, vocab). `logits` (B, q, vocab) float32 and `hidden`
        (B, q, D) are the last forward's query rows (row 0 the main one); `chosen` is what the states before this
        one made of them (at first `logits[:, 0]`)."""
        return chosen

    def record_step(self, step: int) -> None:
        """After step `step`'s token was chosen (e.g. the trace's entry)."""

    def before_decode(self, step: int) -> int:
        """Before the forward of step `step`'s input token -> the query rows it needs (1, or 2 for DRCD)."""
        return 1

    def after_decode(self, tokens: torch.LongTensor, position_ids: torch.LongTensor) -> None:
        """After the forward of `tokens` (B,) at `position_ids` (B, 1)."""

    def outputs(self) -> dict:
        """Fields of `RCPPGenerateOutput` this method fills, e.g. {"rcpp": trace}."""
        return {}


def check_combination(methods) -> None:
    """`registry.check_compatible` (at most one method of each kind), and a contrastive decoder alone: it chooses
    the token from the fused logits of its own two branches."""
    check_compatible(methods)
    decoder = next((method for method in methods if method.kind == "contrastive_decoder"), None)
    if decoder is None:
        return
    if any(method.kind == "decoding" for method in methods):
        raise ValueError(
            f"{decoder.name} is a contrastive decoder and does not compose with RCPP + DRCD (both choose the token "
            "from fused logits): use RCPPGenerationConfig(rcpp=False, methods=[...])"
        )
    others = [method.name for method in methods if method is not decoder]
    if others:
        raise ValueError(f"{decoder.name} is a contrastive decoder and runs alone; got it with {others}")


def check_ragged_rows(methods, counts: tuple[int, ...]) -> None:
    """Rows with different numbers of visual tokens run only with methods that take them (`ragged_rows`)."""
    if len(set(counts)) == 1:
        return
    refusing = [method.name for method in methods if not method.ragged_rows]
    if refusing:
        raise ValueError(
            f"{', '.join(refusing)} need the same number of image tokens in every batch row, got {list(counts)} "
            "(anyres images of different sizes count differently); batch images of one size, or generate the rows "
            "separately (the language-side prefill pruners and RCPP + DRCD run such batches)"
        )


def encodes_images_in_loop(methods) -> bool:
    """Whether `_sample` must encode the images itself: a method records the vision tower while they are encoded,
    or distorts the pixels (`generate` would otherwise encode them once, up front)."""
    return any(method.reads_vision or method.distorts_image for method in methods)


class ActiveMethods:
    """The states of one `generate` call's methods, in kind order, and the forwards they share."""

    def __init__(self, family: ModelFamily, generation_config, methods, input_ids: torch.LongTensor,
                 model_kwargs: dict):  # fmt: skip
        check_combination(methods)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("rcpp_hf's methods start from an empty cache; continuing from past_key_values is not supported")
        counts = family.visual_token_counts(input_ids)
        check_ragged_rows(methods, counts)
        self.ctx = GenerateContext(family, generation_config, input_ids, model_kwargs,
                                   family.prompt_layout(input_ids, model_kwargs), max(counts), counts,
                                   VisualKVCache(config=family.model.config))  # fmt: skip
        ordered = sorted(methods, key=lambda method: KINDS.index(method.kind))
        self.states: list[MethodState] = [method.start(self.ctx) for method in ordered]
        self.ctx.decode_taps = [tap for state in self.states for tap in state.decode_taps]

    @property
    def cache(self) -> VisualKVCache:
        return self.ctx.cache

    def prefill(self) -> torch.Tensor:
        """The prompt's forward -> the final hidden state of its last entry (B, 1, D)."""
        ctx = self.ctx
        ctx.embeds = ctx.family.embed_prompt(ctx.input_ids, ctx.model_kwargs, ctx.encoded)
        taps = [tap for state in self.states for tap in state.prefill_taps]
        hidden, _ = run_decoder(ctx.language_model, ctx.embeds, ctx.layout, ctx.cache, taps=taps)
        for state in self.states:
            state.after_prefill(ctx)
        return hidden[:, -1:]

    def next_token_logits(self, step: int, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, q, vocab), (B, q, D) of the last forward -> the logits (B, vocab) step `step`'s token comes from."""
        chosen = logits[:, 0]
        for state in self.states:
            chosen = state.next_token_logits(step, logits, hidden, chosen)
        return chosen

    def record_step(self, step: int) -> None:
        for state in self.states:
            state.record_step(step)

    def decode(self, step: int, tokens: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """The forward of step `step`'s input `tokens` (B,) at `position_ids` (B, 1) -> hidden (B, rows, D)."""
        num_rows = max([state.before_decode(step) for state in self.states] + [1])
        hidden = decode_token(self.ctx.language_model, tokens[:, None], position_ids, self.cache, num_rows,
                              self.ctx.decode_taps)  # fmt: skip
        for state in self.states:
            state.after_decode(tokens, position_ids)
        return hidden

    def outputs(self) -> dict:
        """The method fields of `RCPPGenerateOutput`: RCPP's trace, the pruning records, a contrast branch's cache."""
        values = {"rcpp": None, "pruning": [], "contrast_past_key_values": None}
        for state in self.states:
            for name, value in state.outputs().items():
                values[name] = values[name] + value if name == "pruning" else value
        return values
