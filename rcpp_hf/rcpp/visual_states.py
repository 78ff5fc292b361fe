"""Stage 2 input — v_i[l]: hidden states of the visual tokens at the scoring layers, captured once at prefill
(by `RCPPTap`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualStates:
    """v_i[l] of the cached visual tokens, in the cache's visual-column order, with their per-token Gram matrices.

    Attributes:
        states: (B, Vc, Ls, D), in the model's dtype.
        gram: (B, Vc, Ls, Ls) float32, G_i[l, m] = <v_i[l], v_i[m]>: visual tokens precede every generated token, so
            their states, and these products, never change during decoding.
    """

    states: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def from_layers(cls, per_layer: list[torch.Tensor]) -> "VisualStates":
        """From one (B, V, D) tensor per scoring layer, as `RCPPTap.captured_states` returns them."""
        states = torch.stack(per_layer, dim=2)
        as_float = states.float()
        return cls(states=states, gram=as_float @ as_float.transpose(-1, -2))

    def keep(self, columns: torch.Tensor) -> "VisualStates":
        """Only the visual columns (B, k), e.g. those an eviction kept."""
        index = columns[:, :, None, None]
        return VisualStates(
            states=self.states.gather(1, index.expand(-1, -1, *self.states.shape[2:])),
            gram=self.gram.gather(1, index.expand(-1, -1, *self.gram.shape[2:])),
        )
