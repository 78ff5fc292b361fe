"""Stage 7 — progressive schedule: lambda_t and the kept fraction of visual tokens as functions of the step."""

from __future__ import annotations

import math


def schedule_progress(step: int, schedule_steps: int, schedule: str) -> float:
    """Fraction of the way from the start value to the end value at decoding `step` (0 at step 0, 1 from
    `schedule_steps` on). "linear" and "cosine" ramp; "step" jumps from 0 to 1 at `schedule_steps`."""
    fraction = min(max(step, 0) / schedule_steps, 1.0)
    if schedule == "linear":
        return fraction
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * fraction))
    if schedule == "step":
        return 1.0 if fraction >= 1.0 else 0.0
    raise ValueError(f"unknown schedule {schedule!r}; expected 'linear', 'cosine' or 'step'")


def scheduled_value(start: float, end: float, step: int, schedule_steps: int, schedule: str) -> float:
    """Value moving from `start` (step 0) to `end` (step >= schedule_steps) along the schedule."""
    return start + (end - start) * schedule_progress(step, schedule_steps, schedule)


def visual_token_budget(keep_ratio: float, num_visual_tokens: int) -> int:
    """Number of visual tokens the cache may hold at this keep ratio: ceil, so that a ratio > 0 always keeps at
    least one token and the budget never exceeds the image."""
    return min(num_visual_tokens, math.ceil(keep_ratio * num_visual_tokens - 1e-9))
