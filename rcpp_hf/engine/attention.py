"""Recorded attention: the probabilities of just the query rows a method needs, whatever attention implementation the
model runs (SDPA, eager, ...).

Why not `output_attentions=True`: transformers >= 4.53 refuses it under SDPA, and it materialises (B, H, S, K) on
every layer. Here the query projection of the layers a method asks for is kept while the layer runs (a forward hook
on `self_attn.q_proj`, removed after the forward), and the needed rows are recomputed against the keys the layer has
just cached: a (B, H, q, K) product on a few layers, and nothing changes in what the layer computes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half


def attention_probs(query: torch.Tensor, keys: torch.Tensor, scaling: float, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scaling) over the allowed keys, in float32.

    Args:
        query: (B, H, q, d), RoPE applied.
        keys: (B, H_kv, K, d), RoPE applied (as cached); query heads share them in groups (GQA), no repeat needed.
        key_mask: (B, q, K) bool, True where the row may attend.
    Returns:
        (B, H, q, K) float32.
    """
    batch, num_heads, num_rows, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    grouped = query.float().reshape(batch, num_kv_heads, num_heads // num_kv_heads, num_rows, head_dim)
    logits = torch.matmul(grouped, keys.float()[:, :, None].transpose(-1, -2)) * scaling  # (B, H_kv, G, q, K)
    logits = logits.masked_fill(~key_mask[:, None, None], float("-inf"))
    return logits.softmax(dim=-1).reshape(batch, num_heads, num_rows, -1)


def rotate_queries(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on queries alone: the query half of `apply_rotary_pos_emb` (transformers' modeling_llama.py), same
    operations in the same order, so the same bits, without rotating keys that are not needed.
    query (B, H, q, d); cos, sin (B, q, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (query * cos) + (rotate_half(query) * sin)


@dataclass
class LayerAttention:
    """What is needed to recompute rows of one layer's attention after it ran.

    Attributes:
        self_attn: the layer's attention module (for `head_dim` and `scaling`).
        query_proj: (B, S, H * d) the layer's query projection, before RoPE.
        position_embeddings: (cos, sin), each (B, S, d), as the layer got them.
        keys: (B, H_kv, K, d) the layer's cached keys after it ran (past entries, then this forward's).
    """

    self_attn: torch.nn.Module
    query_proj: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    keys: torch.Tensor

    def row(self, index: int) -> "LayerAttention":
        """Batch row `index` alone."""
        one = slice(index, index + 1)
        cos, sin = self.position_embeddings
        return LayerAttention(self.self_attn, self.query_proj[one], (cos[one], sin[one]), self.keys[one])

    def probs(self, rows: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the query rows `rows` (B, q) (indices into this forward's queries) over the keys
        allowed by `key_mask` (B, q, K) -> (B, H, q, K) float32."""
        batch, _, width = self.query_proj.shape
        head_dim = self.self_attn.head_dim
        index = rows[:, :, None]
        query = self.query_proj.gather(1, index.expand(-1, -1, width)).view(batch, rows.shape[1], -1, head_dim)
        cos, sin = (t.gather(1, index.expand(-1, -1, t.shape[-1])) for t in self.position_embeddings)
        query = rotate_queries(query.transpose(1, 2), cos, sin)
        return attention_probs(query, self.keys, self.self_attn.scaling, key_mask)


@contextmanager
def keep_query_projections(decoder_layers: dict[int, torch.nn.Module]):
    """While active, the query projection output (B, S, H * d) of each given layer is stored, by layer index, in the
    yielded dict (overwritten by every forward)."""
    kept: dict[int, torch.Tensor] = {}

    def hook_for(layer_idx: int):
        def keep(module, args, output):
            kept[layer_idx] = output

        return keep

    handles = [layer.self_attn.q_proj.register_forward_hook(hook_for(i)) for i, layer in decoder_layers.items()]
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


# -- a layer's own queries / keys recomputed from its input, in float32 (autograd-friendly in any dtype) -----------
def normed_states(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`LlamaRMSNorm` (transformers 5.23, models/llama/modeling_llama.py) in float32: (..., D) -> (..., D) float32.
    The module itself casts back to the model's dtype and would feed a float16 weight a float32 input."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.float()


def project_heads(proj: torch.nn.Linear, normed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A query / key / value projection in float32, split into heads: (B, S, D) -> (B, heads, S, head_dim)."""
    bias = None if proj.bias is None else proj.bias.float()
    out = torch.nn.functional.linear(normed, proj.weight.float(), bias)
    return out.view(*normed.shape[:2], -1, head_dim).transpose(1, 2)


def probe_query(layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A layer's own query for x, recomputed in float32: RoPE(q_proj(input_layernorm(x))) (MC-LCBF's probe, PDrop's
    ranking query).  x (B, q, D), cos / sin (B, q, d) -> (B, H, q, d)."""
    query = project_heads(layer.self_attn.q_proj, normed_states(layer.input_layernorm, x), layer.self_attn.head_dim)
    return rotate_queries(query, cos, sin)


def prompt_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The keys a layer caches for `hidden`, recomputed in float32: RoPE(k_proj(input_layernorm(hidden))).
    hidden (B, S, D), cos / sin (B, S, d) -> (B, H_kv, S, d) float32."""
    keys = project_heads(layer.self_attn.k_proj, normed_states(layer.input_layernorm, hidden), layer.self_attn.head_dim)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]
