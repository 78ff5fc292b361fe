"""CHAIR-style scoring of generated captions against a scene's true kinds.

Every mention of a kind (singular or plural noun of the grammar, see `captions.mentioned_kinds`)
counts once, repeated mentions included, as in the reference CHAIR implementation:

- CHAIR_S: share of captions with at least one hallucinated mention;
- CHAIR_I: hallucinated mentions / all mentions (over all captions);
- recall: true kinds mentioned / true kinds (over all captions);
- length: mean number of words per caption.

ShapesWorld adds the measure its priors were built for: on scenes where a kind's co-occurrence
partner is absent, how often the caption names the absent partner (`partner_hallucination`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from rcpp_hf.shapesworld.captions import mentioned_kinds
from rcpp_hf.shapesworld.world import PARTNER, Scene


@dataclass(frozen=True)
class CaptionScore:
    """One caption's counts, JSON-friendly (`vars(score)`)."""

    mentions: int  # mentions of any kind
    hallucinated: list[str]  # kinds mentioned but absent, one entry per mention
    covered: list[str]  # true kinds mentioned at least once, sorted
    num_true: int  # distinct true kinds
    num_words: int
    lone_kinds: list[str]  # true kinds whose partner is absent, sorted
    partners_named: list[str]  # absent partners of those kinds that the caption names, sorted


def score_caption(text: str, scene: Scene) -> CaptionScore:
    mentions = mentioned_kinds(text)
    truth = scene.kinds
    lone = sorted(scene.lone_kinds())
    return CaptionScore(
        mentions=len(mentions),
        hallucinated=[k for k in mentions if k not in truth],
        covered=sorted(truth.intersection(mentions)),
        num_true=len(truth),
        num_words=len(text.split()),
        lone_kinds=lone,
        partners_named=sorted({PARTNER[k] for k in lone} & set(mentions)),
    )


def chair_metrics(scores: Iterable[CaptionScore | dict]) -> dict:
    """Aggregate per-caption scores (dataclasses or their dicts, e.g. read back from JSON lines).

    `partner_hallucination` is partners named / lone kinds, over captions of scenes with a lone kind;
    `lone_scenes` counts those captions. Ratios with a zero denominator are 0.0.
    """
    rows = [vars(s) if isinstance(s, CaptionScore) else s for s in scores]
    if not rows:
        raise ValueError("no captions to score")
    mentions = sum(r["mentions"] for r in rows)
    hallucinated = sum(len(r["hallucinated"]) for r in rows)
    lone = sum(len(r["lone_kinds"]) for r in rows)
    return {
        "chair_s": sum(bool(r["hallucinated"]) for r in rows) / len(rows),
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": sum(len(r["covered"]) for r in rows) / sum(r["num_true"] for r in rows),
        "length": sum(r["num_words"] for r in rows) / len(rows),
        "partner_hallucination": sum(len(r["partners_named"]) for r in rows) / lone if lone else 0.0,
        "lone_scenes": sum(bool(r["lone_kinds"]) for r in rows),
        "n": len(rows),
    }
