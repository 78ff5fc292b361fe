"""Attention under a keep policy: how the training forward makes a visual token with mask 0 invisible while the
mask still receives a gradient.

Source: DynamicViT's `softmax_with_policy` (raoyongming/DynamicViT, models/dyvit.py), as Dynamic-LLaVA uses it for
LLaVA: p_ij = m_j exp(s_ij) / sum_k m_k exp(s_ik), the diagonal kept (m_ii = 1) so that a dropped token still has
something to attend to. With m binary this is exactly the attention of a sequence without the dropped keys, i.e.
the physically pruned forward; unlike adding log(m) to the logits it stays differentiable at m = 0. Scaling a
token's hidden state by m does neither: in a pre-RMSNorm decoder RMSNorm(m x) ~ RMSNorm(x), so its keys and values
barely change (the reference code's defect 3).

The function is registered as an attention implementation of transformers (`AttentionInterface`) and switched on by
`policy_attention` for the training forward only; a layer receives the policy as the keyword `key_policy`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.models.llama.modeling_llama import repeat_kv

POLICY_ATTENTION = "rcpp_gan_policy"
# A dropped key's logit may exceed the row's maximum over kept keys (the shift). Its mask's derivative,
# dp/dm = exp(logit - shift) / Z (Z >= 1 with binary masks), is the slope at m = 0, while switching the key on moves
# its probability by at most exp(.) / (Z + exp(.)) <= 1: the slope overstates the effect without bound. The exponent is
# capped, which leaves the forward unchanged (the key's weight is 0) and bounds the straight-through surrogate.
# Measured on the 12-layer ShapesWorld model (budget 128, lr 3e-4): at a cap of 80 the gradients overflowed float32
# within 60 steps; at 20 they stayed finite but dominated the sparsity term, and the keep ratio swung between 0.4 and
# 0.99 for 300 steps; at 3 it tracked the targets within 0.1 from step 20 on.
EXPONENT_CAP = 3.0


def policy_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    key_policy: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with a multiplicative key policy, in float32.

    Args:
        query: (B, H, q, d); key, value: (B, H_kv, K, d), RoPE applied (q == K: a forward without cache).
        attention_mask: (B, 1, q, K) bool, True = may attend (causal, packing, padding).
        key_policy: (B, K) keep value of each entry as a key (1 for text), or None (plain attention).
    Returns:
        output (B, q, H, d) in the value's dtype, probabilities (B, H, q, K) float32.
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    weight = attention_mask.to(logits.dtype)
    if key_policy is not None:
        eye = torch.eye(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        weight = weight * torch.where(eye, 1.0, key_policy[:, None, None, :].float())
    shift = logits.masked_fill(weight == 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    probs = torch.exp((logits - shift).clamp(max=EXPONENT_CAP)) * weight
    probs = probs / probs.sum(dim=-1, keepdim=True)
    output = torch.matmul(probs.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(POLICY_ATTENTION, policy_attention_forward)


@contextmanager
def policy_attention(language_model: torch.nn.Module):
    """While active, the decoder's layers attend with `policy_attention_forward` (restored afterwards)."""
    config = language_model.config
    previous = config._attn_implementation
    config._attn_implementation = POLICY_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
