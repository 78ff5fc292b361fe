"""The language model's forward, written out layer by layer so that methods can act between layers.

`run_decoder` is `LlamaModel.forward` of transformers 5.23 (models/llama/modeling_llama.py) with three additions:
  - taps (`DecoderTap`) may drop entries before a layer (prefill pruning: from that layer on, the hidden states hold
    only the kept tokens, at their original positions, and the layer caches only them),
  - each layer gets the mask of its own cached entries (layers may differ in length), or a tap's custom mask (DRCD's
    two query rows),
  - taps may read a layer's output and recompute rows of its attention (`LayerAttention`).
With no taps and no custom masks it makes the same calls in the same order as `LlamaModel.forward`, so its outputs
are bit-identical (tested). It runs any decoder whose layers take (hidden_states, attention_mask, position_ids,
past_key_values, use_cache, position_embeddings), which covers the Llama family that LLaVA checkpoints use.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from rcpp_hf.engine.attention import LayerAttention, keep_query_projections
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.layout import TokenLayout

# Implementations whose masks can express "these query rows see these keys" as a dense 4-D tensor.
DENSE_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


class DecoderTap:
    """Something a method does inside the decoder forward. Every hook is optional.

    Attributes:
        attention_layers: layers whose attention rows the tap wants to recompute in `after_layer`.
    """

    attention_layers: frozenset[int] = frozenset()

    def before_layer(
        self, layer_idx: int, hidden: torch.Tensor, layout: TokenLayout
    ) -> tuple[torch.Tensor, TokenLayout] | None:
        """hidden (B, S, D) entering layer `layer_idx` and its layout -> the entries the layer should run on instead
        (fewer, e.g. `take_entries(...)`), or None to leave them."""
        return None

    def after_layer(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        past: TokenLayout | None,
        layout: TokenLayout,
        attention: LayerAttention | None,
    ) -> None:
        """hidden: (B, q, D) the layer's output for the entries `layout`; `past`: what the layer had cached before
        (None at prefill); `attention` is given for `attention_layers`."""

    def layer_mask(self, layer_idx: int, past: TokenLayout, queries: TokenLayout) -> torch.Tensor | None:
        """A custom (B, 1, q, K_past + q) bool mask (True = attend) for layer `layer_idx`, or None for the causal one."""
        return None


def take_entries(hidden: torch.Tensor, layout: TokenLayout, index: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
    """The entries at `index` (B, k), increasing per row: hidden (B, S, D) -> (B, k, D), and their layout."""
    return hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1])), layout.take(index)


def dense_mask(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A bool (B, 1, q, K) mask in the form `attn_implementation` takes: bool for SDPA, additive for eager."""
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"attn_implementation={attn_implementation!r} takes no per-row masks; this method needs one of "
        f"{DENSE_MASK_IMPLEMENTATIONS} (from_pretrained(..., attn_implementation='sdpa'))"
    )


def causal_layer_mask(config, hidden, past: TokenLayout | None, queries: TokenLayout, cache, layer_idx: int):
    """The mask `LlamaModel.forward` builds, for the entries layer `layer_idx` holds (padding from the layouts)."""
    valid = queries.valid if past is None else torch.cat([past.valid, queries.valid], dim=1)
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=valid.long(),
        past_key_values=cache,
        position_ids=queries.positions,
        layer_idx=layer_idx,
    )


def run_decoder(
    language_model: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    layout: TokenLayout,
    cache: VisualKVCache,
    taps: list[DecoderTap] = (),
    layouts: list[TokenLayout] | None = None,
) -> tuple[torch.Tensor, TokenLayout]:
    """One forward of the decoder over new entries, filling `cache`.

    Args:
        language_model: the decoder (`LlavaModel.language_model`): embed_tokens, layers, rotary_emb, norm.
        inputs_embeds: (B, q, D) the new entries (the prompt at prefill, the generated token's rows at decode).
        layout: their `TokenLayout`.
        cache: at prefill empty (its layouts are registered here), else holding `cache.layouts`.
        layouts: if given, receives the layout each layer ran on, one per layer (what the taps made of `layout`).
    Returns:
        the final-normed hidden states of the entries that reached the last layer (B, q', D), and their layout.
    """
    config = language_model.config
    prefill = not cache.layouts
    layers = language_model.layers[: config.num_hidden_layers]
    attention_layers = {i: layers[i] for tap in taps for i in tap.attention_layers}
    ran_layouts: list[TokenLayout] = []
    masks: dict[tuple[int, int], torch.Tensor | None] = {}  # (id(past layout), id(query layout)) -> mask

    hidden = inputs_embeds
    position_embeddings = language_model.rotary_emb(hidden, position_ids=layout.rope_positions)
    with keep_query_projections(attention_layers) as query_proj:
        for layer_idx, layer in enumerate(layers):
            for tap in taps:
                changed = tap.before_layer(layer_idx, hidden, layout)
                if changed is not None:
                    hidden, layout = changed
                    position_embeddings = language_model.rotary_emb(hidden, position_ids=layout.rope_positions)
            past = None if prefill else cache.layouts[layer_idx]
            custom = [m for tap in taps if (m := tap.layer_mask(layer_idx, past, layout)) is not None]
            if custom:
                mask = dense_mask(custom[-1], config._attn_implementation, hidden.dtype)
            else:
                key = (id(past), id(layout))
                if key not in masks:
                    masks[key] = causal_layer_mask(config, hidden, past, layout, cache, layer_idx)
                mask = masks[key]
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=layout.positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            ran_layouts.append(layout)
            attention = None
            if layer_idx in attention_layers:
                attention = LayerAttention(
                    layer.self_attn, query_proj[layer_idx], position_embeddings, cache.layers[layer_idx].keys
                )
            for tap in taps:
                tap.after_layer(layer_idx, hidden, past, layout, attention)
    if prefill:
        cache.register_layouts(ran_layouts)
    if layouts is not None:
        layouts.extend(ran_layouts)
    return language_model.norm(hidden), layout


def decode_token(
    language_model,
    tokens: torch.LongTensor,
    position_ids: torch.LongTensor,
    cache: VisualKVCache,
    num_rows: int = 1,
    taps: list[DecoderTap] = (),
) -> torch.Tensor:
    """One token per sequence through the decoder as `num_rows` query rows at the same position -> hidden states
    (B, num_rows, D). Row 0 is the main row; further rows are DRCD's contrast rows, whose masks the taps set. The
    cache keeps the main row's entry only, described as a generated (non-visual) entry at `position_ids`, or, in a
    layer where a tap moved the rows' positions, at the position that layer ran it at.

    tokens, position_ids: (B, 1).
    """
    rows = TokenLayout.generated(position_ids.expand(-1, num_rows), cache.layouts[-1].mrope_delta)
    embeds = language_model.embed_tokens(tokens.expand(-1, num_rows))
    ran: list[TokenLayout] = []
    hidden, _ = run_decoder(language_model, embeds, rows, cache, taps=taps, layouts=ran)
    cache.drop_last_entries(num_rows - 1)  # the contrast rows' entries: history is the main branch's
    cache.append_ran_entries(ran)
    return hidden
