"""Theoretical prefill FLOPs of a LLaVA model with prefill-pruning stages, the figure the measured prefill ratio of a
pruner is compared with.

Counted: every Linear / Conv weight of the vision tower and projector once per token it sees (2 FLOPs per
multiply-add), each decoder layer's Linear weights per token it computes plus causal attention (2 n^2 (H d): half of
QK^T and of AV), and the language-model head for the last token. Left out: norms, activations, RoPE, embeddings
(all linear in tokens and small). The vision tower's cost does not shrink with pruning, so the ratio is the fraction
of the whole prefill that a pruner leaves, not the decoder's alone.
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.pruning import PruneStage, visual_tokens_per_layer


def weight_macs(module: torch.nn.Module) -> int:
    """Multiply-adds per token of the module's Linear and Conv weights (a patch embedding counts once per patch)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def prefill_flops(model, stages: list[PruneStage], num_visual: int, num_text: int) -> float:
    """FLOPs of one prompt's prefill with `stages` (empty: unpruned); `model` a LlavaForConditionalGeneration."""
    vision_tokens = num_visual + 1  # the patches and CLS (LLaVA's "default" strategy drops CLS after the tower)
    flops = 2 * (weight_macs(model.model.vision_tower) * vision_tokens + weight_macs(model.model.multi_modal_projector)
                 * num_visual)  # fmt: skip
    text_config = model.config.text_config
    attention_width = text_config.num_attention_heads * getattr(
        text_config, "head_dim", text_config.hidden_size // text_config.num_attention_heads
    )
    layers = model.model.language_model.layers
    visual_per_layer = visual_tokens_per_layer({stage.layer: stage.keep for stage in stages}, len(layers), num_visual)
    for layer, visual in zip(layers, visual_per_layer):
        tokens = num_text + visual
        flops += 2 * weight_macs(layer) * tokens + 2 * tokens * tokens * attention_width
    return flops + 2 * weight_macs(model.lm_head)


def prefill_flops_ratio(model, stages: list[PruneStage], num_visual: int, num_text: int) -> float:
    """Prefill FLOPs with `stages` over the unpruned prefill."""
    return prefill_flops(model, stages, num_visual, num_text) / prefill_flops(model, [], num_visual, num_text)
