"""POPE set construction: 3 yes + 3 no per image, the split rules, and the official file format."""

import json

import pytest

from rcpp_hf.shapesworld.pope_sets import (
    POPE_SPLITS,
    KindStatistics,
    build_pope_questions,
    pope_scenes,
    write_pope_split,
)
from rcpp_hf.shapesworld.questions import question_text
from rcpp_hf.shapesworld.world import KINDS, PARTNER

KIND_OF_QUESTION = {question_text(k): k for k in KINDS}


@pytest.fixture(scope="module")
def scenes():
    return pope_scenes(seed=5, num_images=120)


def by_image(rows):
    grouped = {}
    for row in rows:
        grouped.setdefault(row["image"], []).append(row)
    return grouped


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_three_yes_three_no_per_image_all_true(scenes, split):
    rows = build_pope_questions(scenes, split)
    assert [r["question_id"] for r in rows] == list(range(1, 6 * len(scenes) + 1))
    grouped = by_image(rows)
    for scene in scenes:
        questions = grouped[scene.image_file]
        assert [q["label"] for q in questions] == ["yes", "no"] * 3
        kinds = [KIND_OF_QUESTION[q["text"]] for q in questions]
        assert len(set(kinds)) == 6
        assert all((k in scene.kinds) == (q["label"] == "yes") for k, q in zip(kinds, questions))


def test_positive_questions_are_shared_by_the_splits(scenes):
    yes = {split: [r["text"] for r in build_pope_questions(scenes, split) if r["label"] == "yes"] for split in POPE_SPLITS}
    assert yes["random"] == yes["popular"] == yes["adversarial"]


def test_popular_asks_about_the_most_frequent_absent_kinds(scenes):
    stats = KindStatistics.of(scenes)
    for scene, questions in zip(scenes, by_image(build_pope_questions(scenes, "popular")).values()):
        asked = [KIND_OF_QUESTION[q["text"]] for q in questions if q["label"] == "no"]
        others = set(KINDS) - scene.kinds - set(asked)
        assert min(stats.frequency[k] for k in asked) >= max((stats.frequency[k] for k in others), default=0)


def test_adversarial_asks_about_the_most_co_occurring_absent_kinds(scenes):
    stats = KindStatistics.of(scenes)

    def score(scene, kind):
        return sum(stats.co_occurrence[(p, kind)] for p in scene.kinds)

    lone_partners_asked = 0
    for scene, questions in zip(scenes, by_image(build_pope_questions(scenes, "adversarial")).values()):
        asked = [KIND_OF_QUESTION[q["text"]] for q in questions if q["label"] == "no"]
        others = set(KINDS) - scene.kinds - set(asked)
        assert min(score(scene, k) for k in asked) >= max((score(scene, k) for k in others), default=0)
        lone_partners_asked += sum(PARTNER[k] in asked for k in scene.lone_kinds())
    lone = sum(len(s.lone_kinds()) for s in scenes)
    assert lone > 10 and lone_partners_asked / lone > 0.8  # the absent partner is what adversarial asks about


def test_random_negatives_are_spread_over_the_kinds(scenes):
    asked = {r["text"] for r in build_pope_questions(scenes, "random") if r["label"] == "no"}
    assert len(asked) == len(KINDS)


def test_written_split_is_valid_pope_json_lines_with_images(tmp_path):
    scenes = pope_scenes(seed=6, num_images=4)
    path = write_pope_split(scenes, "adversarial", tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 24
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"question_id", "image", "text", "label"}
        assert isinstance(row["question_id"], int) and row["label"] in ("yes", "no")
        assert (tmp_path / "images" / row["image"]).is_file()


def test_pope_scenes_hold_three_kinds_and_are_deterministic():
    first = pope_scenes(seed=9, num_images=20)
    assert first == pope_scenes(seed=9, num_images=20)
    assert all(len(s.kinds) >= 3 for s in first)


def test_unknown_split_is_an_error(scenes):
    with pytest.raises(ValueError, match="unknown POPE split 'hard'"):
        build_pope_questions(scenes, "hard")
