"""CHAIR on ShapesWorld captions: `rcpp_hf.eval.chair`'s scorer and metrics with the world's vocabulary, plus the
measure the world's priors were built for.

A caption's mentions are the grammar's nouns, singular or plural (`captions.caption_mentions`), every occurrence
counted; its ground truth is the scene's kinds; its length is CHAIR's token count. CHAIR_S, CHAIR_I, recall and length
are then computed exactly as for COCO. The added measure: on scenes where a kind's co-occurrence partner is absent
("lone" kinds), how often the caption names the absent partner.
"""

from __future__ import annotations

from dataclasses import asdict

from rcpp_hf.eval.chair import score_caption, summarize_chair
from rcpp_hf.shapesworld.captions import caption_mentions
from rcpp_hf.shapesworld.world import PARTNER, Scene


def caption_record(text: str, scene: Scene) -> dict:
    """One caption's record fields: `rcpp_hf.eval.chair.CaptionScore`'s, plus `lone_kinds` (true kinds whose partner
    is absent, sorted) and `partners_named` (those absent partners the caption names, sorted)."""
    score = score_caption(text, scene.kinds, mentions=caption_mentions)
    lone = sorted(scene.lone_kinds())
    named = {kind for _, kind in score.mentions}
    return {**asdict(score), "lone_kinds": lone, "partners_named": sorted({PARTNER[k] for k in lone} & named)}


def caption_metrics(records: list[dict]) -> dict:
    """CHAIR metrics of `caption_record` records (e.g. read back from JSON lines), plus

    `partner_hallucination`: partners named / lone kinds, over the captions of scenes with a lone kind
    (0.0 when there is none), and `lone_scenes`, the number of those captions.
    """
    if not records:
        raise ValueError("no captions to score")
    metrics = summarize_chair(records)
    lone = sum(len(r["lone_kinds"]) for r in records)
    named = sum(len(r["partners_named"]) for r in records)
    return {
        **metrics,
        "partner_hallucination": named / lone if lone else 0.0,
        "lone_scenes": sum(bool(r["lone_kinds"]) for r in records),
        "n": len(records),
    }
