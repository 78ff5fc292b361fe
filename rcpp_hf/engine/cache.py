"""`VisualKVCache`: a `DynamicCache` that knows which entries are visual tokens and can evict them physically."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _first_true_columns(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Column indices of the first `count` True entries of each row, in order.  (B, S) bool -> (B, count).
    A stable sort instead of `nonzero`, so no host synchronisation."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]


def cache_nbytes(cache: DynamicCache) -> int:
    """Bytes held by keys and values over all layers of any `DynamicCache`."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


class VisualKVCache(DynamicCache):
    """KV cache of the language model with per-entry bookkeeping, all shaped (B, S) with S = `get_seq_length()`:

    - `positions`: the original (logical) position of each entry; RoPE was applied before caching, so a kept key
      keeps its rotation and new tokens continue at their logical positions, never at the physical length.
    - `visual_ids`: index of the entry's visual token within the prompt's image tokens (0..V-1), -1 otherwise.
    - `valid`: False for left padding.

    The cached visual tokens, in prompt order, are `visual_token_ids` (B, Vc) at physical `visual_slots` (B, Vc);
    "visual columns" below index that order. Every row always holds the same number of visual tokens, so evictions
    remove the same count from each row, from every layer at once.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        self.positions: torch.Tensor | None = None
        self.visual_ids: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.visual_slots: torch.Tensor | None = None
        self.visual_token_ids: torch.Tensor | None = None

    # -- bookkeeping --------------------------------------------------------------------------------------------
    def register_prompt(self, position_ids: torch.Tensor, valid: torch.Tensor, image_token_mask: torch.Tensor) -> None:
        """Describe the prompt's entries after prefill.  All (B, S) — logical positions, non-padding, image tokens."""
        num_visual = int(image_token_mask[0].sum())
        self.positions = position_ids.clone()
        self.valid = valid.clone()
        self.visual_ids = torch.where(image_token_mask, image_token_mask.long().cumsum(dim=1) - 1, -1)
        self._index_visual(num_visual)

    def append_entries(self, position_ids: torch.Tensor) -> None:
        """Describe newly cached non-visual, non-padding entries (generated tokens).  position_ids (B, q)."""
        self.positions = torch.cat([self.positions, position_ids], dim=1)
        self.visual_ids = torch.cat([self.visual_ids, torch.full_like(position_ids, -1)], dim=1)
        self.valid = torch.cat([self.valid, torch.ones_like(position_ids, dtype=torch.bool)], dim=1)

    def drop_last_entries(self, count: int) -> None:
        """Remove the last `count` entries from every layer (e.g. the contrast row's entry), before they are described
        by `append_entries`."""
        if count:
            for layer in self.layers:
                layer.crop(-count)

    def _index_visual(self, num_visual: int) -> None:
        is_visual = self.visual_ids >= 0
        self.visual_slots = _first_true_columns(is_visual, num_visual)
        self.visual_token_ids = self.visual_ids.gather(1, self.visual_slots)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens still cached per row (Vc)."""
        return self.visual_slots.shape[1]

    # -- eviction -----------------------------------------------------------------------------------------------
    def evict_visual(self, columns: torch.Tensor) -> torch.Tensor:
        """Physically remove the visual tokens at visual `columns` (B, k) from every layer.

        Returns the kept visual columns (B, Vc - k), in order, so that callers can compact tensors aligned with the
        cached visual tokens (scores, hidden states).
        """
        batch, num_evict = columns.shape
        remaining = self.num_visual_tokens - num_evict
        if num_evict == 0:
            return torch.arange(self.num_visual_tokens, device=columns.device).expand(batch, -1)
        evicted_columns = torch.zeros(batch, self.num_visual_tokens, dtype=torch.bool, device=columns.device)
        evicted_columns.scatter_(1, columns, True)
        if int(evicted_columns.sum()) != batch * num_evict:
            raise ValueError("evict_visual: each row's columns must be distinct and within the cached visual tokens")
        kept_columns = _first_true_columns(~evicted_columns, remaining)

        keep_entries = torch.ones_like(self.valid)
        keep_entries.scatter_(1, self.visual_slots.gather(1, columns), False)
        kept = _first_true_columns(keep_entries, self.get_seq_length() - num_evict)  # (B, S - k)
        # Advanced indexing copies whole head_dim rows; `gather` would index every element (~2.5x slower on CPU).
        rows = torch.arange(kept.shape[0], device=kept.device)[:, None, None]
        heads = torch.arange(self.layers[0].keys.shape[1], device=kept.device)[None, :, None]
        entries = kept[:, None, :]
        for layer in self.layers:
            layer.keys = layer.keys[rows, heads, entries]
            layer.values = layer.values[rows, heads, entries]
        self.positions = self.positions.gather(1, kept)
        self.visual_ids = self.visual_ids.gather(1, kept)
        self.valid = self.valid.gather(1, kept)
        self._index_visual(remaining)
        return kept_columns

    # -- size ---------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by keys and values over all layers."""
        return cache_nbytes(self)

    def visual_nbytes(self) -> int:
        """Bytes of keys and values that belong to visual tokens."""
        seq = self.get_seq_length()
        return 0 if seq == 0 else self.nbytes() * self.num_visual_tokens // seq
