"""The loss terms of the GAN pruner's training (the loss table of zjw131f1fc/domain-adaptation-token-pruning,
`docs/model_summary.md`), each a pure function; the task term is ShapesWorld's weighted next-token cross-entropy on the
answers (`shapesworld.train.language_loss`).

Every term reaches the pruners' parameters: the masks are never detached (the reference code's defect 1, which made
its sparsity, count and binarisation losses inert), and the task and adversarial terms reach them through the policy
attention of the training forward (`attention.py`).
"""

from __future__ import annotations

import torch
from torch.nn.functional import binary_cross_entropy_with_logits


def adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The pruners' term: make the discriminator call the pruned states real, BCE(D(fake), 1) (non-saturating GAN
    loss, Goodfellow et al. 2014). fake_logits (B,)."""
    return binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(real), 1) + BCE(D(fake), 0); the fake states come detached from the pruners. Each (B,)."""
    return binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits)) + binary_cross_entropy_with_logits(
        fake_logits, torch.zeros_like(fake_logits)
    )


def distillation_loss(
    fake_logits: torch.Tensor, real_logits: torch.Tensor, labels: torch.Tensor, loss_weights: torch.Tensor
) -> torch.Tensor:
    """The ablation's replacement for the adversarial term: KL(unpruned || pruned) of the next-token distributions at
    the positions the task loss scores, weighted like it: sum(w * KL) / sum(w). Logits (B, L, V) (real: no gradient);
    labels, loss_weights (B, L)."""
    scored = labels[:, 1:] != -100
    real = torch.log_softmax(real_logits[:, :-1][scored].float(), dim=-1)
    fake = torch.log_softmax(fake_logits[:, :-1][scored].float(), dim=-1)
    kl = (real.exp() * (real - fake)).sum(-1)
    weights = loss_weights[:, 1:][scored]
    return (kl * weights).sum() / weights.sum()


def sparsity_loss(keep: list[torch.Tensor], targets: tuple[float, ...]) -> torch.Tensor:
    """Mean over stages of (mean keep - target)^2: each stage's cumulative keep ratio pulled toward its target (two-
    sided, where the reference's relu(mean - target)^2 only pushes down). keep: per stage (B, V)."""
    return torch.stack([(k.mean() - t) ** 2 for k, t in zip(keep, targets, strict=True)]).mean()


def token_count_loss(keep: list[torch.Tensor]) -> torch.Tensor:
    """Mean keep over stages and tokens: fewer visual tokens, whatever the target. keep: per stage (B, V)."""
    return torch.stack([k.mean() for k in keep]).mean()


def binarisation_loss(samples: list[torch.Tensor]) -> torch.Tensor:
    """mean m (1 - m) of the relaxed samples: 0 when every mask is 0 or 1. samples: per stage (B, V)."""
    return torch.stack([(m * (1 - m)).mean() for m in samples]).mean()


def budget_loss(keep: list[torch.Tensor], targets: tuple[float, ...], multipliers: torch.Tensor) -> torch.Tensor:
    """The Lagrangian term of "keep ratio = target": sum over stages of multiplier * (mean keep - target). keep: per
    stage the evaluation's cumulative mask (B, V), binary with a straight-through gradient; multipliers (S,), no
    gradient."""
    return sum(m * (k.mean() - t) for k, t, m in zip(keep, targets, multipliers, strict=True))


def dual_ascent(
    multipliers: torch.Tensor, keep_ratios: torch.Tensor, targets: tuple[float, ...], lr: float, bound: float
) -> torch.Tensor:
    """The multipliers' update: each moves by lr * (keep ratio - target) / target, the relative error clipped to
    [-1, 1], and stays within [-bound, bound]; so it rises while its stage keeps too many tokens and falls (below 0
    if need be) while it keeps too few. Both clips are anti-windup: a 12-layer run without them pushed its last stage
    (target 1 token of 100, starting at 17) to a multiplier of 53 within 20 steps, dropped every token, and needed
    over 200 steps to unwind; with them at lr 2 the multipliers swung between the bounds and the first stage's keep
    ratio between 0.33 and 0.84 (target 0.23); lr 0.2 is the default. multipliers, keep_ratios (S,)."""
    targets = torch.tensor(targets, dtype=keep_ratios.dtype, device=keep_ratios.device)
    error = ((keep_ratios - targets) / targets).clamp(-1.0, 1.0)
    return (multipliers + lr * error).clamp(-bound, bound)
