"""An attention implementation that is SDPA everywhere, and also records attention probabilities where RCPP needs
them: on the scoring layers, for the main query row only.

Why not `output_attentions=True`: it forces eager attention on every layer and materialises (B, H, Q, K) per layer.
Here each scoring layer computes one extra q.k row per batch element, reusing the query and the cached keys of the
same forward; the attention output itself stays the SDPA output, so neutral settings are bit-identical to vanilla.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

RCPP_ATTENTION = "rcpp_sdpa"


@dataclass
class AttentionRecorder:
    """Collects, per scoring layer, the head-averaged attention probabilities of one query row.

    Args:
        layers: absolute indices of the scoring layers.
        query_row: index of the recorded row among the forward's query positions (the main row).
        key_mask: (B, K) bool, the keys the probabilities are normalised over: everything the row could see without
            the C/N masking (text, history, every cached visual token, itself), so that alpha covers all cached visual
            tokens even when the main row's attention is restricted to C.
    """

    layers: frozenset[int]
    query_row: int
    key_mask: torch.Tensor
    probs: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query (B, H, Q, d), key (B, H_kv, K, d) -> stores (B, K) float32 for `layer_idx`."""
        batch, num_heads, _, head_dim = query.shape
        num_kv_heads = key.shape[1]
        # Group query heads by the kv head they share (GQA), so keys need no repeat.
        q = query[:, :, self.query_row, :].reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        logits = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling  # (B, H_kv, G, K)
        logits = logits.masked_fill(~self.key_mask[:, None, None, :], float("-inf"))
        self.probs[layer_idx] = logits.softmax(dim=-1).mean(dim=(1, 2))

    def visual_alpha(self, visual_slots: torch.Tensor) -> torch.Tensor:
        """alpha[t, i, l] for the cached visual tokens at physical `visual_slots` (B, Vc) -> (B, Ls, Vc)."""
        return torch.stack([self.probs[layer].gather(1, visual_slots) for layer in sorted(self.layers)], dim=1)


def rcpp_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    rcpp_recorder: AttentionRecorder | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if rcpp_recorder is not None and module.layer_idx in rcpp_recorder.layers:
        rcpp_recorder.record(module.layer_idx, query, key, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_rcpp_attention() -> None:
    """Make `RCPP_ATTENTION` known to transformers (idempotent); its masks are SDPA's."""
    AttentionInterface.register(RCPP_ATTENTION, rcpp_sdpa_attention_forward)
    AttentionMaskInterface.register(RCPP_ATTENTION, sdpa_mask)
