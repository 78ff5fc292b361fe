"""Vision-side pruning: what the vision tower computed, recorded for the pruners that choose visual tokens before
the language model sees them (VisPruner, CDPruner, VisionZip, ...).

They need, for the one vision layer they read, the CLS query's attention over the patches and the patches' keys.
`output_attentions=True` would make every vision layer materialise (N, H, T, T) (and is refused under SDPA), so
`record_vision_attention` keeps only that layer's q / k projections with forward hooks while the tower runs (as
`engine/attention.py` does for the language model); the tower keeps its attention implementation, and the rows
needed are recomputed afterwards (`VisionRecord.cls_attention`). The pruners themselves are
`methods.prefill_pruner.VisionPruner`s; the model family records the tower for them (`families/`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch



def vision_encoder_layers(vision_tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder layers of a CLIP / SigLIP-style vision tower (with or without a `vision_model` wrapper)."""
    return getattr(vision_tower, "vision_model", vision_tower).encoder.layers


def feature_attention_layer(feature_layer: int, num_layers: int) -> int:
    """The encoder layer whose output is `hidden_states[feature_layer]` (index 0 is the embeddings, so layer
    `i` outputs `hidden_states[i + 1]`): LLaVA-1.5's -2 on 24 layers -> 22, the layer VisionZip's `attentions[-2]`
    and VisPruner's / CDPruner's `select_layer` read. Raises when it names the embeddings or lies outside."""
    if not -(num_layers + 1) <= feature_layer <= num_layers:
        raise ValueError(f"vision feature layer {feature_layer} is out of range for a tower of {num_layers} layers")
    index = feature_layer % (num_layers + 1)
    if index == 0:
        raise ValueError(f"vision feature layer {feature_layer} is the embeddings, which no attention layer produces")
    return index - 1


def gather_tokens(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, D) per-token values at `index` (B, k) -> (B, k, D)."""
    return values.gather(1, index[:, :, None].expand(-1, -1, values.shape[-1]))


@dataclass
class VisionRecord:
    """What the vision tower computed for the images of a batch, one image per row.

    Attributes:
        queries: (B, T, Dv) the read layer's query projection over the tower's T tokens (CLS first), before the head
            split and the scaling.
        keys: (B, T, Dv) its key projection.
        features: (B, V, Dv) the vision features the projector took (LLaVA's feature layer and selection), in the
            order of the image tokens.
        num_heads: heads of the read layer.
        scale: its attention scaling (head_dim ** -0.5).
        first_visual: index among the T tower tokens of the first visual token (1 when LLaVA drops CLS).
        projector: the multi-modal projector, (..., Dv) -> (..., D), for states built from merged features.
        post_layernorm: the tower's final layer norm (CLIP's image-embedding path).
        input_ids: (B, S) the prompt's token ids (for methods that read the instruction's text).
        name_or_path: the checkpoint the model was loaded from (for methods that need its tokenizer).
    """

    queries: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    num_heads: int
    scale: float
    first_visual: int
    projector: torch.nn.Module
    post_layernorm: torch.nn.Module | None = None
    input_ids: torch.Tensor | None = None
    name_or_path: str = ""

    def heads(self, projection: torch.Tensor) -> torch.Tensor:
        """(B, T, Dv) -> (B, H, T, d) float32."""
        batch, tokens, _ = projection.shape
        return projection.float().view(batch, tokens, self.num_heads, -1).transpose(1, 2)

    def cls_attention(self) -> torch.Tensor:
        """The CLS query's attention probabilities over the visual tokens, per head -> (B, H, V) float32 (softmax
        over all T keys, CLS included, as the tower computed it)."""
        logits = self.heads(self.queries[:, :1]) @ self.heads(self.keys).transpose(-1, -2) * self.scale  # (B, H, 1, T)
        return logits.softmax(dim=-1)[:, :, 0, self.first_visual :]

    def visual_keys(self) -> torch.Tensor:
        """The visual tokens' keys averaged over heads -> (B, V, d) float32 (VisionZip's metric)."""
        return self.heads(self.keys).mean(dim=1)[:, self.first_visual :]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features (B, n, Dv) -> language-model input states (B, n, D), as LLaVA projects its features."""
        return self.projector(features.to(self.features.dtype))


@contextmanager
def record_vision_attention(vision_tower: torch.nn.Module, layer_idx: int):
    """While active, the yielded dict holds "queries" and "keys": the q / k projections (N, T, Dv) of encoder layer
    `layer_idx` from the tower's last forward."""
    attention = vision_encoder_layers(vision_tower)[layer_idx].self_attn
    kept: dict[str, torch.Tensor] = {}

    def keep_as(name: str):
        def keep(module, args, output):
            kept[name] = output

        return keep

    handles = [attention.q_proj.register_forward_hook(keep_as("queries")),
               attention.k_proj.register_forward_hook(keep_as("keys"))]  # fmt: skip
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()
