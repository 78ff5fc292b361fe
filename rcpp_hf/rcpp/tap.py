"""What RCPP + DRCD does inside a decoder forward: record alpha on the scoring layers (stage 2), capture v_i[l] at
prefill (stage 2 input), and give DRCD's two query rows their masks (stage 6).

RCPP's visual tokens are the ones the deepest layer holds: with a prefill pruner in front, RCPP scores, groups and
evicts only the tokens that survived it. Visual entries that earlier layers still cache although a later pruning
stage dropped them stay outside C and N: both DRCD rows see them, as the pruned model alone would.
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.attention import LayerAttention
from rcpp_hf.engine.decoder import DecoderTap
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.rcpp.masks import drcd_attention_mask


def slots_of(visual_ids: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Entry index of each visual token of `wanted` (B, k) among entries whose visual ids are `visual_ids` (B, S);
    every wanted token must be there."""
    return (visual_ids[:, None, :] == wanted[:, :, None]).to(torch.int8).argmax(dim=2)


class RCPPTap(DecoderTap):
    """Records, per forward, the main row's attention probabilities on the scoring layers (and at prefill the visual
    tokens' hidden states there); masks DRCD's two rows.

    Args:
        scoring_layers: absolute, sorted indices of the scoring layers.
    """

    def __init__(self, scoring_layers: list[int]):
        self.scoring_layers = scoring_layers
        self.attention_layers = frozenset(scoring_layers)
        self.probs: dict[int, torch.Tensor] = {}  # layer -> (B, K_l) main row's probabilities over the layer's keys
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prefill: layer -> (B, Vl, D), (B, Vl) ids
        self.slots: dict[int, torch.Tensor] = {}  # layer -> (B, Vc) cache entry of each of RCPP's visual tokens
        self.num_rows = 1
        self.core_ids: torch.Tensor | None = None  # (B, V) C by prompt visual id; None: causal masks
        self.noise_ids: torch.Tensor | None = None
        # Built once per forward for the layers that share a cached layout (not once per layer); kept with the layout
        # they were built for (held, so that an identity check cannot match a new layout at a recycled address).
        self._drcd_mask: tuple[TokenLayout, torch.Tensor] | None = None  # (B, 1, rows, K_past + rows)
        self._main_row_keys: tuple[TokenLayout, torch.Tensor] | None = None  # (B, 1, K_past + rows)

    def set_rows(self, num_rows: int, core_ids: torch.Tensor | None, noise_ids: torch.Tensor | None) -> None:
        """The next decode forward: 1 or 2 query rows (main, contrast), C and N by visual id (B, V) or None."""
        self.num_rows, self.core_ids, self.noise_ids = num_rows, core_ids, noise_ids
        self._drcd_mask = self._main_row_keys = None  # both depend on the rows

    def layer_mask(self, layer_idx: int, past: TokenLayout | None, queries: TokenLayout) -> torch.Tensor | None:
        if past is None or self.core_ids is None:
            return None
        if self._drcd_mask is None or self._drcd_mask[0] is not past:
            mask = drcd_attention_mask(past.valid, past.visual_ids, self.core_ids, self.noise_ids, self.num_rows)
            self._drcd_mask = (past, mask)
        return self._drcd_mask[1]

    def after_layer(self, layer_idx, hidden, past, layout, attention: LayerAttention | None) -> None:
        if attention is None:
            return
        batch, num_queries = hidden.shape[:2]
        if past is None:  # prefill: the last prompt row over the prompt; keep the visual tokens' states
            row = num_queries - 1
            key_mask = layout.valid[:, None, :]
            slots = layout.visual_slots
            states = hidden.gather(1, slots[:, :, None].expand(-1, -1, hidden.shape[-1]))
            self.captured[layer_idx] = (states, layout.visual_ids.gather(1, slots))
        else:  # decode: the main row sees everything cached and its own entry, not the contrast row's
            row = 0
            if self._main_row_keys is None or self._main_row_keys[0] is not past:
                own = torch.eye(num_queries, dtype=torch.bool, device=hidden.device)[:1].expand(batch, -1)
                self._main_row_keys = (past, torch.cat([past.valid, own], dim=1)[:, None, :])
            key_mask = self._main_row_keys[1]
        rows = torch.full((batch, 1), row, dtype=torch.long, device=hidden.device)
        self.probs[layer_idx] = attention.probs(rows, key_mask).mean(dim=1)[:, 0]

    def locate(self, layouts: list[TokenLayout], visual_token_ids: torch.Tensor) -> None:
        """Find RCPP's visual tokens (B, Vc) among each scoring layer's cached entries; after prefill and evictions.
        (Appended entries go to the end, so the slots stay valid until the next eviction.)"""
        self.slots = {layer: slots_of(layouts[layer].visual_ids, visual_token_ids) for layer in self.scoring_layers}

    def visual_alpha(self) -> torch.Tensor:
        """alpha[t, i, l] of the last forward's main row on RCPP's visual tokens -> (B, Ls, Vc)."""
        return torch.stack([self.probs[layer].gather(1, self.slots[layer]) for layer in self.scoring_layers], dim=1)

    def captured_states(self, visual_token_ids: torch.Tensor) -> list[torch.Tensor]:
        """v_i[l] of RCPP's visual tokens (B, Vc) from the prefill, one (B, Vc, D) tensor per scoring layer."""
        states = []
        for layer in self.scoring_layers:
            hidden, ids = self.captured[layer]
            index = slots_of(ids, visual_token_ids)[:, :, None]
            states.append(hidden.gather(1, index.expand(-1, -1, hidden.shape[-1])))
        return states
