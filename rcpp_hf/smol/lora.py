"""LoRA on the language model's projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
layout of peft's `tuners/lora/layer.py`): y = W x + scale * B (A x), with A (rank, in) and B (out, rank).

B starts at zero, so a fresh adapter leaves the model unchanged; `merge_lora` folds it back into W for the
shipped checkpoint, which then is a plain LlavaForConditionalGeneration.
"""

from __future__ import annotations

import math

import torch

# Every attention and MLP projection of a Llama decoder layer (transformers' LlamaAttention / LlamaMLP names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; x (..., in) -> (..., out)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        # peft's default init: A kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros.
        bound = 1 / math.sqrt(base.in_features)
        self.lora_A = torch.nn.Parameter((torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(language_model: torch.nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Wrap every `LORA_TARGETS` linear of `language_model` in place (seeded A); returns them by module name."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, module in list(language_model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, torch.nn.Linear):
                lora = LoRALinear(child, rank, alpha, generator)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def merge_lora(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """W + (B @ A) * scale in float32, W (out, in), A (rank, in), B (out, rank): deterministic on CPU."""
    return weight.float() + (lora_B.float() @ lora_A.float()) * scale
