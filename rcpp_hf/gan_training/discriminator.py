"""The discriminator: tells the unpruned model's text hidden states (real) from the pruned model's (fake).

Source: zjw131f1fc/domain-adaptation-token-pruning, `docs/model_summary.md` and `method/models/discriminator.py`:
the text hidden states of several layers, each pooled over the sequence with weights rising 0.3 -> 1.0 after
Gaussian noise whose std falls 0.05 -> 0.01 along it (later tokens have seen more context, so they weigh more and
are trusted more); a small MLP per layer, the results concatenated, a fusion MLP, one logit (sigmoid = probability
of "real"). Optional spectral norm on every Linear (Miyato et al. 2018) bounds its Lipschitz constant.
Real and fake go through the same `pool_states` (the reference pooled only the real ones: its defect 2).
"""

from __future__ import annotations

import torch
from torch import nn


def ramp(valid: torch.Tensor, start: float, end: float) -> torch.Tensor:
    """(B, T) bool -> (B, T) float: `start` at each row's first valid entry rising linearly to `end` at its last,
    0 on invalid entries (valid entries are a row's first ones, padding after them)."""
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    index = torch.arange(valid.shape[1], device=valid.device)[None, :]
    fraction = index / (count - 1).clamp_min(1)
    return torch.where(valid, start + (end - start) * fraction, 0.0)


def pool_states(
    states: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator | None,
    noise_scale: tuple[float, float] = (0.05, 0.01),
    pool_weight: tuple[float, float] = (0.3, 1.0),
) -> torch.Tensor:
    """Position-aware noise, then weighted mean pooling: states (B, T, D), valid (B, T) -> (B, D) float32.
    `generator` None: no noise."""
    states = states.float()
    if generator is not None:
        noise = torch.randn(states.shape, generator=generator, device=states.device)
        states = states + noise * ramp(valid, *noise_scale)[:, :, None]
    weights = ramp(valid, *pool_weight)
    return (states * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True)


class Discriminator(nn.Module):
    """Args:
        hidden_size: width of the text hidden states.
        num_layers: how many layers' states it reads.
        width: hidden width of its MLPs.
        spectral_norm: wrap every Linear in `torch.nn.utils.parametrizations.spectral_norm`.
    """

    def __init__(self, hidden_size: int, num_layers: int, width: int = 256, spectral_norm: bool = False):
        super().__init__()

        def linear(fan_in: int, fan_out: int) -> nn.Module:
            layer = nn.Linear(fan_in, fan_out)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        self.per_layer = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), linear(hidden_size, width), nn.LeakyReLU(0.2))
            for _ in range(num_layers)
        )
        self.fusion = nn.Sequential(linear(num_layers * width, width), nn.LeakyReLU(0.2), linear(width, 1))

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """One pooled state (B, D) per layer -> logits (B,) (sigmoid: probability that the states are real)."""
        features = [mlp(states) for mlp, states in zip(self.per_layer, pooled, strict=True)]
        return self.fusion(torch.cat(features, dim=-1)).squeeze(-1)
