"""`VisualKVCache`: a `DynamicCache` that knows, per layer, which entries are visual tokens and can drop them."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rcpp_hf.engine.layout import TokenLayout, first_true_columns


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values over all layers of any `DynamicCache`."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


class VisualKVCache(DynamicCache):
    """KV cache of the language model with a `TokenLayout` per layer (`layouts[l]` describes the entries of layer l).

    RoPE was applied before caching, so a kept key keeps its rotation and new tokens continue at their logical
    positions, never at the physical length. Layers may differ in length: a prefill pruner computes and caches only the
    kept visual tokens from its pruning layer on. Layers that hold the same entries share one layout object, so masks
    and position embeddings are built once per distinct layout.

    The convenience properties (`positions`, `valid`, `visual_ids`, `visual_slots`, `visual_token_ids`,
    `num_visual_tokens`) describe the deepest layer, whose visual tokens are the ones every layer still holds;
    "visual columns" index that layer's visual tokens in order. Evictions remove those tokens from every layer.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        self.layouts: list[TokenLayout] = []

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def register_prompt(self, position_ids: torch.Tensor, valid: torch.Tensor, image_token_mask: torch.Tensor) -> None:
        """Describe an unpruned prompt cached by every layer.  All (B, S): logical positions, non-padding, image tokens."""
        self.register_layouts([TokenLayout.prompt(position_ids, valid, image_token_mask)] * len(self.layers))

    def register_layouts(self, layouts: list[TokenLayout]) -> None:
        """Describe each layer's entries after a (possibly pruned) prefill, one layout per layer."""
        if len(layouts) != len(self.layers):
            raise ValueError(f"expected one layout per cached layer ({len(self.layers)}), got {len(layouts)}")
        self.layouts = list(layouts)

    def append_entries(self, position_ids: torch.Tensor) -> None:
        """Describe newly cached non-visual, non-padding entries (generated tokens) of every layer.  (B, q)."""
        self._map_layouts(lambda layout: layout.extend(position_ids))

    def append_ran_entries(self, queries: list[TokenLayout]) -> None:
        """Describe the entry each layer just cached for a decoded token: column 0 of `queries[l]`, the query rows
        layer l ran (`run_decoder`'s `layouts`), at the position that layer ran it at. It differs from the forward's
        input positions only where a tap moved them (a pruner that renumbers positions)."""
        if len(queries) != len(self.layouts):
            raise ValueError(f"expected one query layout per cached layer ({len(self.layouts)}), got {len(queries)}")
        new: dict[tuple[int, int], TokenLayout] = {}
        for layout, query in zip(self.layouts, queries):  # layers that shared a layout and ran alike keep sharing
            key = (id(layout), id(query))
            if key not in new:
                new[key] = layout.extend(query.positions[:, :1])
        self.layouts = [new[(id(layout), id(query))] for layout, query in zip(self.layouts, queries)]

    def drop_last_entries(self, count: int) -> None:
        """Remove the last `count` entries from every layer (e.g. the contrast row's entry), before they are described
        by `append_entries`."""
        if count:
            for layer in self.layers:
                layer.crop(-count)

    def forget_last_entries(self, count: int) -> None:
        """Remove the last `count` described entries (keys, values and layouts) from every layer, e.g. to compute
        them again."""
        self.drop_last_entries(count)
        self._map_layouts(lambda layout: layout.crop(count))

    def _map_layouts(self, change) -> None:
        """Apply `change` once per distinct layout, keeping layers that shared a layout sharing the new one."""
        new: dict[int, TokenLayout] = {}
        for layout in self.layouts:
            if id(layout) not in new:
                new[id(layout)] = change(layout)
        self.layouts = [new[id(layout)] for layout in self.layouts]

    def _keep_entries(self, drop) -> None:
        """Apply `drop` (a layout -> (the new layout, the kept entries' physical indices (B, S'))) once per distinct
        layout, and keep those entries of each layer's keys and values."""
        kept_entries: dict[int, torch.Tensor] = {}

        def change(layout: TokenLayout) -> TokenLayout:
            new_layout, kept_entries[id(layout)] = drop(layout)
            return new_layout

        old_layouts = list(self.layouts)
        self._map_layouts(change)
        for layer, layout in zip(self.layers, old_layouts):
            # Advanced indexing copies whole head_dim rows; `gather` would index every element (~2.5x slower on CPU).
            kept = kept_entries[id(layout)]
            rows = torch.arange(kept.shape[0], device=kept.device)[:, None, None]
            heads = torch.arange(layer.keys.shape[1], device=kept.device)[None, :, None]
            layer.keys = layer.keys[rows, heads, kept[:, None, :]]
            layer.values = layer.values[rows, heads, kept[:, None, :]]

    # -- the deepest layer's view -------------------------------------------------------------------------------
    @property
    def positions(self) -> torch.Tensor:
        return self.layouts[-1].positions

    @property
    def valid(self) -> torch.Tensor:
        return self.layouts[-1].valid

    @property
    def visual_ids(self) -> torch.Tensor:
        return self.layouts[-1].visual_ids

    @property
    def visual_slots(self) -> torch.Tensor:
        """(B, Vc) physical index of each visual token of the deepest layer."""
        return self.layouts[-1].visual_slots

    @property
    def visual_token_ids(self) -> torch.Tensor:
        """(B, Vc) prompt index (0..V-1) of each visual token of the deepest layer, in order."""
        return self.layouts[-1].visual_token_ids

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens still cached per row by the deepest layer (Vc)."""
        return self.layouts[-1].num_visual

    # -- eviction -----------------------------------------------------------------------------------------------
    def evict_visual(self, columns: torch.Tensor) -> torch.Tensor:
        """Physically remove the visual tokens at visual `columns` (B, k) of the deepest layer from every layer.

        Returns the kept visual columns (B, Vc - k), in order, so that callers can compact tensors aligned with the
        cached visual tokens (scores, hidden states).
        """
        batch, num_evict = columns.shape
        if num_evict == 0:
            return torch.arange(self.num_visual_tokens, device=columns.device).expand(batch, -1)
        evicted_columns = torch.zeros(batch, self.num_visual_tokens, dtype=torch.bool, device=columns.device)
        evicted_columns.scatter_(1, columns, True)
        if int(evicted_columns.sum()) != batch * num_evict:
            raise ValueError("evict_visual: each row's columns must be distinct and within the cached visual tokens")
        kept_columns = first_true_columns(~evicted_columns, self.num_visual_tokens - num_evict)
        evicted_ids = self.visual_token_ids.gather(1, columns)
        self._keep_entries(lambda layout: layout.without_visual(evicted_ids))
        return kept_columns

    def evict_visual_rows(self, columns: torch.Tensor) -> torch.Tensor:
        """`evict_visual` for rows that evict different numbers of visual tokens (and may hold different numbers):
        `columns` (B, k) names each row's visual columns of the deepest layer, -1 after a row's own. A row left with
        fewer entries than another is left-padded with invalid entries (`TokenLayout.take_rows`).

        Returns, per row, the old visual column of each new one (B, Vc'), for tensors aligned with the cached visual
        tokens; a row's columns after its own (visual-token id -1 in `visual_token_ids`) name any old column."""
        ids = self.visual_token_ids
        evicted_ids = torch.where(columns >= 0, ids.gather(1, columns.clamp_min(0)), -2)  # -2: no entry's id

        def drop(layout: TokenLayout) -> tuple[TokenLayout, torch.Tensor]:
            hit = (layout.visual_ids[:, :, None] == evicted_ids[:, None, :]).any(dim=2)
            return layout.take_rows(~hit)

        self._keep_entries(drop)
        return (ids[:, None, :] == self.visual_token_ids[:, :, None]).to(torch.int8).argmax(dim=2)

    # -- size ---------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by keys and values over all layers."""
        return cache_nbytes(self)

    def visual_nbytes(self) -> int:
        """Bytes of keys and values that belong to visual tokens."""
        total = 0
        for layer, layout in zip(self.layers, self.layouts):
            if layer.is_initialized and layout.seq_len:
                entries = layout.visual_ids.numel()  # rows may hold different numbers of visual entries
                total += (layer.keys.nbytes + layer.values.nbytes) * sum(layout.visual_counts) // entries
        return total
