"""Stage 2 input — v_i[l]: hidden states of the visual tokens at the scoring layers, captured once at prefill."""

from __future__ import annotations

from contextlib import contextmanager

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
