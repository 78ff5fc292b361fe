"""The pruner's optional text-to-vision attention residual ("Attention Residual" of
zjw131f1fc/domain-adaptation-token-pruning, `docs/model_summary.md`: the text -> vision attention makes the keep
decision more question-dependent).

The feature of a visual token is how much the question attends to it at the pruning layer: the layer's own query
(question rows) and key projections of the hidden states entering it, RoPE applied, softmax over the keys each row may
see (PyramidDrop's ranking attention, `methods/pdrop.py` `light_attention`, with every question row instead of the
last one), averaged over heads and question rows, as the log of its ratio to uniform over the visual tokens present
(0: the question attends to it like to an average visual token). The training forward and the evaluation prefill call
the same function on the same hidden states, so with binary masks the two give the same feature; it is an input to
the pruner (no gradient flows back through it).
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.attention import attention_probs, probe_query, prompt_keys
from rcpp_hf.engine.vision import gather_tokens

# Floor of the attention ratio before the log: a visual token dropped by an earlier stage gets attention 0 in the
# training forward (its logit no longer matters, but log 0 times a zero scale would be NaN).
RATIO_FLOOR = 1e-6


@torch.no_grad()
def question_attention_feature(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    question_rows: torch.Tensor,
    question_valid: torch.Tensor,
    key_mask: torch.Tensor,
    visual_slots: torch.Tensor,
    key_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """log(V_present * mean over heads and question rows of the attention to each visual token), in float32.

    Args:
        layer: the decoder layer about to run (a transformers LlamaDecoderLayer).
        hidden: (B, S, D) its input.
        position_embeddings: (cos, sin), each (B, S, head_dim), of the entries of `hidden`.
        question_rows: (B, T) indices of the question's entries; question_valid (B, T) bool, False on padding.
        key_mask: (B, T, S) bool, the keys each question row may see (causal, padding).
        visual_slots: (B, V) indices of the visual entries.
        key_weight: (B, S) the training forward's keep policy (1 for text, the cumulative mask for visual entries),
            None when every entry is present (evaluation): p_j = w_j exp(s_j) / sum_k w_k exp(s_k).
    Returns:
        (B, V) float32.
    """
    cos, sin = position_embeddings
    query = probe_query(layer, gather_tokens(hidden, question_rows), gather_tokens(cos, question_rows),
                        gather_tokens(sin, question_rows))  # fmt: skip
    present = torch.full(visual_slots.shape, 1.0, device=hidden.device)
    if key_weight is not None:  # dropped keys out of the softmax: the others' need not underflow beside them
        key_mask = key_mask & (key_weight[:, None, :] > 0)
        present = key_weight.gather(1, visual_slots).float()
    probs = attention_probs(query, prompt_keys(layer, hidden, cos, sin), layer.self_attn.scaling, key_mask)
    if key_weight is not None:  # the policy softmax (`attention.py`) as a reweighting of the plain one (soft masks)
        probs = probs * key_weight[:, None, None, :].float()
        probs = probs / probs.sum(dim=-1, keepdim=True)
    visual = probs.mean(dim=1).gather(2, visual_slots[:, None, :].expand(-1, probs.shape[2], -1))  # (B, T, V)
    valid = question_valid[:, :, None].float()
    mean = (visual * valid).sum(dim=1) / valid.sum(dim=1)
    return (mean * present.sum(dim=1, keepdim=True)).clamp_min(RATIO_FLOOR).log()
