"""Yes/no existence questions about a scene, worded as POPE words them."""

from __future__ import annotations

import random

from rcpp_hf.shapesworld.world import KINDS, Scene

YES, NO = "Yes", "No"


def question_text(kind: str) -> str:
    """`question_text("arrow")` is "Is there an arrow in the image?"."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {sorted(KINDS)}")
    article = "an" if kind[0] in "aeiou" else "a"
    return f"Is there {article} {kind} in the image?"


def sample_questions(scene: Scene, rng: random.Random, num_yes: int, num_no: int) -> list[tuple[str, str]]:
    """Up to `num_yes` present and `num_no` absent kinds drawn uniformly, as (kind, answer) pairs."""
    present = sorted(scene.kinds)
    absent = sorted(set(KINDS) - scene.kinds)
    picks = [(k, YES) for k in rng.sample(present, min(num_yes, len(present)))]
    picks += [(k, NO) for k in rng.sample(absent, min(num_no, len(absent)))]
    return picks
