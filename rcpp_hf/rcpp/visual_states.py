"""Stage 2 input — v_i[l]: hidden states of the visual tokens at the scoring layers, captured once at prefill."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def capture_visual_states(decoder_layers: list[torch.nn.Module], visual_slots: torch.Tensor):
    """While active, each layer's output (B, S, D) at `visual_slots` (B, V) is stored; yields a list that holds,
    after the forward, one (B, V, D) tensor per layer, in the order of `decoder_layers`."""
    captured: list[torch.Tensor] = []
    index = visual_slots[:, :, None]

    def keep_visual_rows(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden.gather(1, index.expand(-1, -1, hidden.shape[-1])))

    handles = [layer.register_forward_hook(keep_visual_rows) for layer in decoder_layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


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
        """From one (B, V, D) tensor per scoring layer, as `capture_visual_states` collects them."""
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
