"""The optional token merger ("Token Merger V3 - Fixed Pooling" of zjw131f1fc/domain-adaptation-token-pruning,
`docs/model_summary.md`): M learnable queries, modulated by the question, pool the image's visual tokens by
cross-attention into M merged tokens that replace them before the first decoder layer, (B, V, D) -> (B, M, D); the layer
pruners then act on the M merged tokens.

Deviations from that summary, which gives only the outline: the question modulates the queries by FiLM (Perez et al.
2018) from the mean of its embeddings; the values of the cross-attention are the visual embeddings themselves (no
value or output projection), so a merged token is a convex combination of the projector's outputs (as VisionZip's
contextual tokens are means of vision features) and stays in the input space the frozen decoder was trained on.

Merged token m takes the place and the original position of visual token `merge_columns(V, M)[m]`, the first of
the m-th of M equal runs of the image's tokens, so the text after the image keeps its positions (the engine's
recycled tokens, `PrefillPruner.recycle`, as VisionZip's contextual tokens take their targets' places).
"""

from __future__ import annotations

import torch
from torch import nn

from rcpp_hf.methods.gan_pruner.config import GanPrunerConfig


def merge_columns(num_visual: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Visual columns (count,) whose places the merged tokens take: m * V // M, increasing and distinct."""
    if not 1 <= count <= num_visual:
        raise ValueError(f"the token merger's {count} merged tokens must be in [1, {num_visual}] (the image's tokens)")
    return torch.arange(count, device=device) * num_visual // count


class TokenMerger(nn.Module):
    """M question-modulated queries pooling the visual tokens at the decoder's input."""

    def __init__(self, config: GanPrunerConfig):
        super().__init__()
        self.num_heads = config.pruner_heads
        self.queries = nn.Parameter(torch.empty(config.token_merger, config.pruner_hidden))  # set by `_init_weights`
        self.norm = nn.LayerNorm(config.hidden_size)
        self.project_keys = nn.Linear(config.hidden_size, config.pruner_hidden)
        self.film = nn.Linear(config.hidden_size, 2 * config.pruner_hidden)  # (scale, shift) from the question

    def forward(self, visual: torch.Tensor, question: torch.Tensor, question_valid: torch.Tensor) -> torch.Tensor:
        """visual (B, V, D), question (B, T, D), question_valid (B, T) bool -> merged tokens (B, M, D) float32."""
        valid = question_valid[:, :, None].float()
        question = (self.norm(question.float()) * valid).sum(dim=1) / valid.sum(dim=1)  # (B, D)
        scale, shift = self.film(question)[:, None].chunk(2, dim=-1)
        queries = self.queries * (1 + scale) + shift  # (B, M, h)
        keys = self.project_keys(self.norm(visual.float()))  # (B, V, h)
        batch, width = keys.shape[0], keys.shape[-1] // self.num_heads
        queries = queries.view(batch, -1, self.num_heads, width).transpose(1, 2)
        keys = keys.view(batch, -1, self.num_heads, width).transpose(1, 2)
        weights = torch.softmax(queries @ keys.transpose(-1, -2) * width**-0.5, dim=-1).mean(dim=1)  # (B, M, V)
        return weights @ visual.float()
