"""Questions about a scene, worded as POPE and MME word them: existence, count, colour and position.

Existence is POPE's "Is there a star in the image?". The other three are MME's hallucination
subtasks (count, color, position), each in a yes/no form and, for count and colour, an open form:

- count: "How many stars are there in the image?" ("Two"), "Are there two stars in the image?";
- colour, about a kind the scene holds exactly once (so "the star" names one object):
  "What color is the star?" ("Red"), "Is the star red?";
- position, on the grid's cells, about kinds held exactly once: "Is the star left of the moon?"
  (also right of / above / below: the column or row strictly before or after) and
  "Is the star in the top row?" / "Is the star in the left column?".

Each `*_pair` function draws one question answered yes and one answered no about a scene, as MME
asks them per image, or None when the scene cannot support the subtask. Wrong claims are near
misses (the true number of another kind, another colour, the opposite relation), so the answer
needs the image.
"""

from __future__ import annotations

import random

from rcpp_hf.shapesworld.captions import COUNT_WORDS
from rcpp_hf.shapesworld.world import COLOURS, KINDS, Scene, ShapeObject

YES, NO = "Yes", "No"
NUMBER_WORDS = ("one", *COUNT_WORDS[1:])  # "one" ... "six": the grammar's counts
RELATIONS = ("left of", "right of", "above", "below")
ROW_NAMES = ("top", "middle", "bottom")  # the 3 x 3 grid's rows and columns
COLUMN_NAMES = ("left", "middle", "right")

QuestionPair = tuple[tuple[str, str], tuple[str, str]]  # ((question, "Yes"), (question, "No"))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {sorted(KINDS)}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def question_text(kind: str) -> str:
    """`question_text("arrow")` is "Is there an arrow in the image?"."""
    _check_kind(kind)
    return f"Is there {_article(kind)} {kind} in the image?"


def sample_questions(scene: Scene, rng: random.Random, num_yes: int, num_no: int) -> list[tuple[str, str]]:
    """Up to `num_yes` present and `num_no` absent kinds drawn uniformly, as (kind, answer) pairs."""
    present = sorted(scene.kinds)
    absent = sorted(set(KINDS) - scene.kinds)
    picks = [(k, YES) for k in rng.sample(present, min(num_yes, len(present)))]
    picks += [(k, NO) for k in rng.sample(absent, min(num_no, len(absent)))]
    return picks


def count_of(scene: Scene, kind: str) -> int:
    return sum(o.kind == kind for o in scene.objects)


def count_question(kind: str) -> str:
    """`count_question("star")` is "How many stars are there in the image?"."""
    _check_kind(kind)
    return f"How many {KINDS[kind]} are there in the image?"


def count_answer(count: int) -> str:
    """The open answer to a count question: `count_answer(2)` is "Two"."""
    if not 1 <= count <= len(NUMBER_WORDS):
        raise ValueError(f"count must be in [1, {len(NUMBER_WORDS)}], got {count}")
    return NUMBER_WORDS[count - 1].capitalize()


def count_claim(kind: str, count: int) -> str:
    """MME's yes/no count form: "Is there one star in the image?", "Are there two stars in the image?"."""
    _check_kind(kind)
    number = count_answer(count).lower()
    return f"Is there one {kind} in the image?" if count == 1 else f"Are there {number} {KINDS[kind]} in the image?"


def colour_question(kind: str) -> str:
    _check_kind(kind)
    return f"What color is the {kind}?"


def colour_claim(kind: str, colour: str) -> str:
    """`colour_claim("star", "red")` is "Is the star red?"."""
    _check_kind(kind)
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; colours are {sorted(COLOURS)}")
    return f"Is the {kind} {colour}?"


def relation_holds(first: ShapeObject, relation: str, second: ShapeObject) -> bool:
    """Whether `first` is `relation` `second` on the grid: strictly an earlier / later column or row."""
    if relation == "left of":
        return first.col < second.col
    if relation == "right of":
        return first.col > second.col
    if relation == "above":
        return first.row < second.row
    if relation == "below":
        return first.row > second.row
    raise ValueError(f"unknown relation {relation!r}; relations are {RELATIONS}")


def relation_claim(first: str, relation: str, second: str) -> str:
    """`relation_claim("star", "left of", "moon")` is "Is the star left of the moon?"."""
    for kind in (first, second):
        _check_kind(kind)
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; relations are {RELATIONS}")
    return f"Is the {first} {relation} the {second}?"


def row_claim(kind: str, row: int) -> str:
    """`row_claim("star", 0)` is "Is the star in the top row?"."""
    _check_kind(kind)
    return f"Is the {kind} in the {ROW_NAMES[row]} row?"


def column_claim(kind: str, col: int) -> str:
    """`column_claim("star", 2)` is "Is the star in the right column?"."""
    _check_kind(kind)
    return f"Is the {kind} in the {COLUMN_NAMES[col]} column?"


def single_objects(scene: Scene) -> list[ShapeObject]:
    """The objects whose kind the scene holds exactly once ("the star" names them), in reading order."""
    return [o for o in scene.objects if count_of(scene, o.kind) == 1]


def existence_pair(scene: Scene, rng: random.Random) -> QuestionPair:
    """A present kind (yes) and a uniformly drawn absent kind (no)."""
    (present, _), (absent, _) = sample_questions(scene, rng, 1, 1)
    return (question_text(present), YES), (question_text(absent), NO)


def count_pair(scene: Scene, rng: random.Random) -> QuestionPair:
    """A present kind's true count n (yes), and the same number n claimed of another kind (no): a present
    kind held another number of times if there is one, else an absent kind.

    Both claims name the same number, so the number word tells nothing: claiming "two" of a kind held
    once would be answered "no" from the text alone, since most kinds are held once (measured: 0.95
    accuracy on that form after 200 steps while existence was still at chance).
    """
    kind = rng.choice(sorted(scene.kinds))
    count = count_of(scene, kind)
    miscounted = sorted(k for k in scene.kinds if count_of(scene, k) != count)
    wrong = rng.choice(miscounted or sorted(set(KINDS) - scene.kinds))
    return (count_claim(kind, count), YES), (count_claim(wrong, count), NO)


def colour_pair(scene: Scene, rng: random.Random) -> QuestionPair | None:
    """A kind held once: its colour (yes) and another colour (no). None without such a kind."""
    singles = single_objects(scene)
    if not singles:
        return None
    obj = rng.choice(singles)
    wrong = rng.choice([c for c in COLOURS if c != obj.colour])
    return (colour_claim(obj.kind, obj.colour), YES), (colour_claim(obj.kind, wrong), NO)


def position_pair(scene: Scene, rng: random.Random) -> QuestionPair | None:
    """Mostly (3 in 4) a relation between two kinds held once: a true one (yes) and its opposite (no);
    otherwise, or with fewer than two such kinds, `grid_pair`. None without any kind held once."""
    singles = single_objects(scene)
    if len(singles) < 2 or rng.random() >= 0.75:
        return grid_pair(scene, rng)
    first, second = rng.sample(singles, 2)  # distinct cells: they differ in row, column or both
    true = rng.choice([r for r in RELATIONS if relation_holds(first, r, second)])
    opposite = RELATIONS[RELATIONS.index(true) ^ 1]  # left of <-> right of, above <-> below
    return (relation_claim(first.kind, true, second.kind), YES), (relation_claim(first.kind, opposite, second.kind), NO)


def grid_pair(scene: Scene, rng: random.Random) -> QuestionPair | None:
    """A kind held once: its row or column (yes) and another row or column (no). None without such a kind."""
    singles = single_objects(scene)
    if not singles:
        return None
    obj = rng.choice(singles)
    if rng.random() < 0.5:
        wrong = rng.choice([r for r in range(len(ROW_NAMES)) if r != obj.row])
        return (row_claim(obj.kind, obj.row), YES), (row_claim(obj.kind, wrong), NO)
    wrong = rng.choice([c for c in range(len(COLUMN_NAMES)) if c != obj.col])
    return (column_claim(obj.kind, obj.col), YES), (column_claim(obj.kind, wrong), NO)
