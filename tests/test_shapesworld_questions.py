"""Question generators: wording, and answers checked against hand-built scenes."""

import random
import re
from collections import Counter

import pytest

from rcpp_hf.shapesworld.conversations import POPE_SUFFIX, training_turns
from rcpp_hf.shapesworld.questions import (
    NO,
    YES,
    colour_claim,
    colour_pair,
    count_answer,
    count_claim,
    count_of,
    count_pair,
    count_question,
    existence_pair,
    grid_pair,
    position_pair,
    relation_claim,
    relation_holds,
    single_objects,
)
from rcpp_hf.shapesworld.world import COLOURS, Scene, ShapeObject, sample_scene


def obj(kind, colour, row, col):
    return ShapeObject(kind, colour, "normal", row, col, (col + 0.5) * 53.3, (row + 0.5) * 53.3)


# Reading order; the grid:   star(red)   .          moon(blue)
#                            .           circle     .
#                            circle      .          .
SCENE = Scene(0, 0, (obj("star", "red", 0, 0), obj("moon", "blue", 0, 2), obj("circle", "green", 1, 1), obj("circle", "white", 2, 0)))


def test_wording():
    assert count_question("cross") == "How many crosses are there in the image?"
    assert count_claim("star", 1) == "Is there one star in the image?"
    assert count_claim("cross", 3) == "Are there three crosses in the image?"
    assert [count_answer(n) for n in (1, 2, 6)] == ["One", "Two", "Six"]
    assert colour_claim("arrow", "white") == "Is the arrow white?"
    assert relation_claim("star", "left of", "moon") == "Is the star left of the moon?"
    with pytest.raises(ValueError, match="count"):
        count_answer(7)
    with pytest.raises(ValueError, match="colour"):
        colour_claim("star", "pink")
    with pytest.raises(ValueError, match="relation"):
        relation_claim("star", "near", "moon")


def test_counts_and_single_objects_of_the_hand_built_scene():
    assert [count_of(SCENE, k) for k in ("star", "moon", "circle", "heart")] == [1, 1, 2, 0]
    assert [o.kind for o in single_objects(SCENE)] == ["star", "moon"]


def test_relations_on_the_grid():
    star, moon, centre, bottom_left = SCENE.objects
    assert relation_holds(star, "left of", moon) and relation_holds(moon, "right of", star)
    assert not relation_holds(star, "above", moon) and not relation_holds(star, "below", moon)  # same row
    assert relation_holds(star, "above", centre) and relation_holds(star, "left of", centre)
    assert relation_holds(bottom_left, "below", star) and not relation_holds(bottom_left, "left of", star)  # same column


# Every claim about SCENE and its truth, written out by hand from the grid above.
TRUE_CLAIMS = {
    "Is there a star in the image?", "Is there a moon in the image?", "Is there a circle in the image?",
    "Is there one star in the image?", "Is there one moon in the image?", "Are there two circles in the image?",
    "Is the star red?", "Is the moon blue?",
    "Is the star left of the moon?", "Is the moon right of the star?",
    "Is the star in the top row?", "Is the moon in the top row?", "Is the star in the left column?",
    "Is the moon in the right column?",
}  # fmt: skip


@pytest.mark.parametrize("draw", [existence_pair, count_pair, colour_pair, position_pair, grid_pair])
def test_pairs_on_the_hand_built_scene_hold_one_true_and_one_false_claim(draw):
    seen = set()
    for seed in range(60):
        (yes_question, yes), (no_question, no) = draw(SCENE, random.Random(seed))
        assert (yes, no) == (YES, NO)
        assert yes_question in TRUE_CLAIMS, yes_question
        assert no_question not in TRUE_CLAIMS, no_question
        seen.add(yes_question)
    if draw is colour_pair:
        assert seen == {"Is the star red?", "Is the moon blue?"}  # never "the circle": there are two
    if draw is position_pair:
        assert {"Is the star left of the moon?", "Is the moon right of the star?"} <= seen


def test_wrong_claims_are_near_misses():
    for seed in range(40):
        (yes_question, _), (no_question, _) = count_pair(SCENE, random.Random(seed))
        # The same number, claimed of a kind held another number of times (star and moon once, circles twice).
        if yes_question == "Are there two circles in the image?":
            assert no_question in ("Are there two stars in the image?", "Are there two moons in the image?")
        else:
            assert no_question == "Is there one circle in the image?"
        (_, _), (no_question, _) = position_pair(SCENE, random.Random(seed))
        assert not no_question.endswith(("above the moon?", "below the moon?", "above the star?", "below the star?"))


def test_count_claims_name_the_same_number_and_fall_back_to_an_absent_kind():
    twins = Scene(0, 0, (obj("star", "red", 0, 0), obj("star", "red", 1, 1)))
    for seed in range(20):
        (yes_question, _), (no_question, _) = count_pair(twins, random.Random(seed))
        assert yes_question == "Are there two stars in the image?"
        assert no_question.startswith("Are there two ") and "stars" not in no_question


def test_colour_and_position_need_a_kind_held_once():
    twins = Scene(0, 0, (obj("star", "red", 0, 0), obj("star", "red", 1, 1)))
    assert colour_pair(twins, random.Random(0)) is None
    assert position_pair(twins, random.Random(0)) is None
    lone = Scene(0, 0, (obj("heart", "purple", 2, 1),))
    (question, _), (wrong, _) = position_pair(lone, random.Random(0))
    assert question in ("Is the heart in the bottom row?", "Is the heart in the middle column?")
    assert wrong != question and wrong.startswith("Is the heart in the")


COLOUR_WORDS = "|".join(COLOURS)
QUESTION_TYPES = {
    "existence": r"Is there an? \w+ in the image\?",
    "count": r"(How many \w+ are there|Is there one \w+|Are there \w+ \w+) in the image\?",
    "colour": rf"What color is the \w+\?|Is the \w+ ({COLOUR_WORDS})\?",
    "position": r"Is the \w+ ((left of|right of|above|below) the \w+|in the \w+ (row|column))\?",
}


def test_training_mixture_holds_every_question_type_with_balanced_answers():
    scenes = [sample_scene(0, i) for i in range(300)]
    answers = Counter()
    kinds_seen = Counter()
    for scene in scenes:
        turns = training_turns(scene)
        assert turns[0][1].endswith(".")  # the caption comes first
        for user, answer in turns[1:]:
            question = user.removesuffix(POPE_SUFFIX)
            kind = next(name for name, pattern in QUESTION_TYPES.items() if re.fullmatch(pattern, question))
            kinds_seen[kind] += 1
            answers[(kind, answer in (YES, NO), answer == YES)] += 1
    assert min(kinds_seen.values()) >= 300
    for kind in ("existence", "count", "colour", "position"):
        yes, no = answers[(kind, True, True)], answers[(kind, True, False)]
        assert 0.4 <= yes / (yes + no) <= 0.6, kind
    assert answers[("count", False, False)] >= 290 and answers[("colour", False, False)] >= 200  # open answers
