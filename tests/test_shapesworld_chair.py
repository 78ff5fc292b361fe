"""CHAIR counts on hand-written captions, checked by hand."""

import pytest

from rcpp_hf.shapesworld.chair import caption_metrics, caption_record
from rcpp_hf.shapesworld.world import Scene, ShapeObject


def scene(*kinds):
    return Scene(0, 0, tuple(ShapeObject(k, "red", "normal", i // 3, i % 3, 0.0, 0.0) for i, k in enumerate(kinds)))


STAR_CIRCLE = scene("star", "circle")  # star without its moon: a lone star
SQUARE_TRIANGLE_CROSS = scene("square", "triangle", "cross")  # a complete pair, no lone kind


def test_score_of_a_faithful_caption():
    s = caption_record("a red star left of a red circle.", STAR_CIRCLE)
    assert s["mentions"] == [("star", "star"), ("circle", "circle")]
    assert (s["hallucinated"], s["recalled"], s["ground_truth"]) == ([], ["circle", "star"], ["circle", "star"])
    assert s["length"] == 9  # 8 words and the full stop, CHAIR's tokens
    assert (s["lone_kinds"], s["partners_named"]) == (["star"], [])


def test_score_counts_every_hallucinated_mention_and_plurals():
    s = caption_record("two red stars above a white moon, a moon and three hearts.", STAR_CIRCLE)
    assert [kind for _, kind in s["mentions"]] == ["star", "moon", "moon", "heart"]
    assert s["hallucinated"] == [("moon", "moon"), ("moon", "moon"), ("hearts", "heart")]
    assert s["recalled"] == ["star"]
    assert s["partners_named"] == ["moon"]


def test_chair_metrics_by_hand():
    records = [
        caption_record("a red star left of a red circle.", STAR_CIRCLE),  # 2 mentions, 0 hallucinated, 9 tokens
        caption_record("a star above a moon.", STAR_CIRCLE),  # 2 mentions, 1 hallucinated (the partner), 6 tokens
        caption_record("a square, a triangle and two hearts.", SQUARE_TRIANGLE_CROSS),  # 3 mentions, 1 hallucinated, 9
    ]
    m = caption_metrics(records)
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(2 / 7)
    assert m["recall"] == pytest.approx((2 + 1 + 2) / (2 + 2 + 3))
    assert m["length"] == pytest.approx((9 + 6 + 9) / 3)
    assert m["partner_hallucination"] == pytest.approx(1 / 2)  # 2 lone stars, one moon named
    assert (m["lone_scenes"], m["n"]) == (2, 3)


def test_chair_metrics_read_records_back_from_json():
    import json

    records = [caption_record("a star above a moon.", STAR_CIRCLE)]
    assert caption_metrics(json.loads(json.dumps(records))) == caption_metrics(records)


def test_empty_caption_and_empty_list():
    m = caption_metrics([caption_record("", STAR_CIRCLE)])
    assert (m["chair_s"], m["chair_i"], m["recall"], m["length"]) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="no captions"):
        caption_metrics([])
