"""Cosine schedules of the loss weights and the Gumbel temperature (zjw131f1fc/domain-adaptation-token-pruning,
`docs/model_summary.md`: cosine loss-weight schedules, temperature annealing), functions of the training progress
only, so a resumed run sees the same values."""

from __future__ import annotations

import math


def cosine_schedule(start: float, end: float, step: int, steps: int) -> float:
    """`start` at step 0, `end` at step `steps` (and after), half-cosine between: the midpoint is their mean."""
    progress = min(max(step / steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
