"""`TokenLayout`: what each entry of a sequence is, once entries can be dropped.

A pruned layer no longer holds the prompt's entries at their prompt indices, so every consumer (masks, RoPE, the KV
cache, scores) needs, per entry, its logical position, whether it is padding, and which visual token it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch


def first_true_columns(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Column indices of the first `count` True entries of each row, in order.  (B, S) bool -> (B, count).
    A stable sort instead of `nonzero`, so no host synchronisation."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :count]


VISUAL_VIEWS = ("visual_counts", "num_visual", "visual_slots", "visual_token_ids")  # cached views of visual entries


@dataclass(frozen=True)
class TokenLayout:
    """Per-entry bookkeeping of one sequence of hidden states or cache entries, all (B, S), entries in logical order.

    Attributes:
        positions: logical position of each entry (what RoPE was or will be applied with).
        valid: False for left padding.
        visual_ids: index of the entry's visual token among the prompt's image tokens (0..V-1), -1 otherwise.
        mrope: (3, B, S) the temporal / height / width positions RoPE uses in models with M-RoPE (Qwen2-VL), whose
            `positions` are then the text row (what the mask reads); None for 1-D RoPE.
        mrope_delta: (B, 1) with `mrope`: how far M-RoPE's positions of the text after the image (and of generated
            tokens) are from their `positions` (transformers' `rope_deltas`).
    Rows usually hold the same number of visual entries. They differ when the rows' images do (anyres images of
    different sizes): the visual views are then padded to the row with the most (`visual_counts` says how many
    of each row's are real; padding slots name non-visual entries, of visual-token id -1), and a row that keeps
    fewer entries than another is left-padded with invalid entries (`take_rows`), as a left-padded prompt is.
    A layout is never changed in place (every edit returns a new one), so its derived views are computed once: a
    decode step asks for them on every layer, and `num_visual` costs a host synchronisation.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    visual_ids: torch.Tensor
    mrope: torch.Tensor | None = None
    mrope_delta: torch.Tensor | None = None

    @classmethod
    def prompt(
        cls,
        position_ids: torch.Tensor,
        valid: torch.Tensor,
        image_token_mask: torch.Tensor,
        mrope: torch.Tensor | None = None,
        mrope_delta: torch.Tensor | None = None,
    ) -> "TokenLayout":
        """The layout of an unpruned prompt: (B, S) logical positions, non-padding, image-token mask (and, for
        M-RoPE, its (3, B, S) positions and (B, 1) delta)."""
        visual_ids = torch.where(image_token_mask, image_token_mask.long().cumsum(dim=1) - 1, -1)
        return cls(positions=position_ids.clone(), valid=valid.clone(), visual_ids=visual_ids,
                   mrope=None if mrope is None else mrope.clone(), mrope_delta=mrope_delta)  # fmt: skip

    @classmethod
    def generated(cls, positions: torch.Tensor, mrope_delta: torch.Tensor | None = None) -> "TokenLayout":
        """Generated tokens (non-visual, non-padding) at logical `positions` (B, q); with `mrope_delta`, their
        M-RoPE positions are `positions + mrope_delta` in all three rows."""
        mrope = None if mrope_delta is None else (positions + mrope_delta).expand(3, -1, -1)
        return cls(positions=positions, valid=torch.ones_like(positions, dtype=torch.bool),
                   visual_ids=torch.full_like(positions, -1), mrope=mrope, mrope_delta=mrope_delta)  # fmt: skip

    @property
    def rope_positions(self) -> torch.Tensor:
        """What the decoder's rotary embedding takes: `positions` (B, S), or M-RoPE's (3, B, S)."""
        return self.positions if self.mrope is None else self.mrope

    @property
    def seq_len(self) -> int:
        return self.positions.shape[1]

    @cached_property
    def visual_counts(self) -> tuple[int, ...]:
        """Visual entries of each row."""
        return tuple((self.visual_ids >= 0).sum(dim=1).tolist())

    @property
    def ragged(self) -> bool:
        """Whether rows hold different numbers of visual entries."""
        return len(set(self.visual_counts)) > 1

    @cached_property
    def num_visual(self) -> int:
        """Visual entries per row (the most any row holds, when rows differ)."""
        return max(self.visual_counts)

    @cached_property
    def visual_slots(self) -> torch.Tensor:
        """(B, Vl) index of each visual entry, in order (then padding slots, in a row with fewer)."""
        return first_true_columns(self.visual_ids >= 0, self.num_visual)

    @cached_property
    def visual_token_ids(self) -> torch.Tensor:
        """(B, Vl) visual-token id of each visual entry, in order (-1 at padding slots)."""
        return self.visual_ids.gather(1, self.visual_slots)

    def row(self, index: int) -> "TokenLayout":
        """Row `index` alone, (1, S)."""
        return self._select(lambda entries: entries[..., index : index + 1, :], lambda delta: delta[index : index + 1])

    def take_rows(self, keep: torch.Tensor) -> tuple["TokenLayout", torch.Tensor]:
        """The entries where `keep` (B, S) bool is True, in order, rows with fewer kept entries left-padded to the
        longest with invalid, non-visual entries (copies of the row's first entry: no query attends to them).
        Returns the new layout and the entry index (B, k) it was gathered from, for tensors aligned with this one."""
        counts = keep.sum(dim=1)
        width = int(counts.max())
        pad = width - counts  # (B,) padding entries each row gets
        kept = first_true_columns(keep, width)  # a short row's last columns name dropped entries: rolled to the front
        column = torch.arange(width, device=keep.device)
        shifted = (column[None, :] - pad[:, None]) % width
        index = kept.gather(1, shifted)
        padding = column[None, :] < pad[:, None]
        index = torch.where(padding, 0, index)
        taken = self.take(index)
        padded = replace(taken, valid=taken.valid & ~padding, visual_ids=torch.where(padding, -1, taken.visual_ids))
        return padded, index

    def take(self, index: torch.Tensor) -> "TokenLayout":
        """The entries at `index` (B, k), which must be increasing in each row (logical order is kept)."""
        return self._select(lambda entries: entries.gather(-1, index.expand(*entries.shape[:-2], -1, -1)))

    def _select(self, entries, delta=lambda delta: delta) -> "TokenLayout":
        """The layout of `entries(t)` for each per-entry tensor t, (B, S) or M-RoPE's (3, B, S); `delta` for the
        per-row (B, 1) M-RoPE delta."""
        return TokenLayout(
            positions=entries(self.positions),
            valid=entries(self.valid),
            visual_ids=entries(self.visual_ids),
            mrope=None if self.mrope is None else entries(self.mrope),
            mrope_delta=None if self.mrope_delta is None else delta(self.mrope_delta),
        )

    def extend(self, positions: torch.Tensor) -> "TokenLayout":
        """Append non-visual, non-padding entries (generated tokens) at logical `positions` (B, q)."""
        new = TokenLayout.generated(positions, self.mrope_delta)
        extended = TokenLayout(
            positions=torch.cat([self.positions, new.positions], dim=1),
            valid=torch.cat([self.valid, new.valid], dim=1),
            visual_ids=torch.cat([self.visual_ids, new.visual_ids], dim=1),
            mrope=None if self.mrope is None else torch.cat([self.mrope, new.mrope], dim=2),
            mrope_delta=self.mrope_delta,
        )
        for view in VISUAL_VIEWS:  # the appended entries are not visual: views already computed carry over
            if view in self.__dict__:
                extended.__dict__[view] = self.__dict__[view]
        return extended

    def with_positions(self, positions: torch.Tensor) -> "TokenLayout":
        """The same entries at other logical `positions` (B, S), e.g. renumbered by a pruner."""
        if positions.shape != self.positions.shape:
            raise ValueError(f"positions must be {tuple(self.positions.shape)}, got {tuple(positions.shape)}")
        if self.mrope is not None:
            raise ValueError("moving entries to other positions is not implemented for M-RoPE's 3-D positions "
                             "(Qwen2-VL); keep the original positions (e.g. PDrop's positions='original')")  # fmt: skip
        moved = replace(self, positions=positions)
        for view in VISUAL_VIEWS:  # the entries are the same: views already computed carry over
            if view in self.__dict__:
                moved.__dict__[view] = self.__dict__[view]
        return moved

    def crop(self, count: int) -> "TokenLayout":
        """Without the last `count` entries."""
        end = self.seq_len - count
        return self._select(lambda entries: entries[..., :end])

    def without_visual(self, visual_token_ids: torch.Tensor) -> tuple["TokenLayout", torch.Tensor]:
        """Drop the entries of the visual tokens `visual_token_ids` (B, k); each must be present in its row.

        Returns the new layout and the kept entry indices (B, S - k), for tensors aligned with this layout.
        """
        num_drop = visual_token_ids.shape[1]
        hit = (self.visual_ids[:, :, None] == visual_token_ids[:, None, :]).any(dim=2)  # (B, S)
        if int(hit.sum()) != hit.shape[0] * num_drop:
            raise ValueError("each row must name distinct visual tokens that the layout holds")
        kept = first_true_columns(~hit, self.seq_len - num_drop)
        return self.take(kept), kept


def text_after_image(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of the text after the image (the instruction, in llava-hf's template), in order: indices (B, T) padded
    to the longest row (with the last entry, a real query), and which are real (B, T) bool. Text entries are never
    dropped, so row k of the prompt is row k of any pruned layout."""
    visual = layout.visual_ids >= 0
    index = torch.arange(layout.seq_len, device=visual.device)
    last_visual = torch.where(visual, index, -1).max(dim=1, keepdim=True).values
    after = (index > last_visual) & layout.valid
    count = int(after.sum(dim=1).max())
    rows = first_true_columns(after, count)
    real = after.gather(1, rows)
    return torch.where(real, rows, layout.seq_len - 1), real
