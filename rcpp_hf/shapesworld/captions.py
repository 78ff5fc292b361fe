"""The caption grammar of ShapesWorld, and the parser that reads object mentions back from any text.

Grammar (lower case, one sentence):

    caption  := phrase "."                                   (one group)
              | phrase relation phrase {", " phrase} [" and " phrase] "."
    phrase   := count [size] colour noun                     "a small red circle", "two blue stars"
    count    := "a" | "an" | "two" | ... | "six"             ("an" before a vowel)
    relation := "left of" | "right of" | "above" | "below"   (where the first group's first object
                                                              lies relative to the second group's)

Objects with the same kind, colour and size form one group ("two small red circles"). Groups are
mentioned in the world's salience order (`MENTION_ORDER`, co-occurrence partners adjacent) with
probability `ORDERED_MENTION_PROB`, otherwise in a random order: a biased order, as in COCO captions.
"""

from __future__ import annotations

import random
import re

from rcpp_hf.shapesworld.world import KINDS, MENTION_ORDER, Scene, ShapeObject

ORDERED_MENTION_PROB = 0.9
COUNT_WORDS = ("a", "two", "three", "four", "five", "six")

# Every singular and plural noun of the grammar, mapped to its kind.
NOUN_TO_KIND: dict[str, str] = {noun: kind for kind, plural in KINDS.items() for noun in (kind, plural)}

_WORD = re.compile(r"[a-z]+")


def _with_article(words: list[str]) -> str:
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def describe_group(kind: str, colour: str, size: str, count: int) -> str:
    """One noun phrase: `describe_group("arrow", "red", "small", 1)` is "a small red arrow"."""
    if not 1 <= count <= len(COUNT_WORDS):
        raise ValueError(f"count must be in [1, {len(COUNT_WORDS)}], got {count}")
    words = (["small"] if size == "small" else []) + [colour, kind if count == 1 else KINDS[kind]]
    return _with_article(words) if count == 1 else " ".join([COUNT_WORDS[count - 1], *words])


def relation(first: ShapeObject, second: ShapeObject) -> str:
    """Where `first` lies relative to `second` ("first <relation> second"), on the axis of larger offset."""
    dx, dy = first.x - second.x, first.y - second.y
    if abs(dx) >= abs(dy):
        return "right of" if dx > 0 else "left of"
    return "below" if dy > 0 else "above"


def mention_groups(scene: Scene, rng: random.Random) -> list[list[ShapeObject]]:
    """The scene's objects grouped by (kind, colour, size), in the order a caption mentions them."""
    groups: dict[tuple[str, str, str], list[ShapeObject]] = {}
    for obj in scene.objects:  # objects are in reading order, so are the groups' members
        groups.setdefault(obj.attributes, []).append(obj)
    ordered = list(groups.values())
    if rng.random() < ORDERED_MENTION_PROB:
        ordered.sort(key=lambda g: MENTION_ORDER.index(g[0].kind))  # stable: reading order within a kind
    else:
        rng.shuffle(ordered)
    return ordered


def reference_caption(scene: Scene) -> str:
    """The scene's caption in the grammar (deterministic: its wording randomness is the scene's own)."""
    if not scene.objects:
        raise ValueError("a scene without objects has no caption")
    groups = mention_groups(scene, scene.rng("caption"))
    phrases = [describe_group(*g[0].attributes, count=len(g)) for g in groups]
    if len(phrases) == 1:
        return phrases[0] + "."
    head = f"{phrases[0]} {relation(groups[0][0], groups[1][0])} {phrases[1]}"
    rest = phrases[2:]
    if not rest:
        return head + "."
    return ", ".join([head, *rest[:-1]]) + f" and {rest[-1]}."


def caption_mentions(text: str) -> list[tuple[str, str]]:
    """(noun, kind) for every mention of a kind in free text, in order; plurals map to their kind.

    Words outside the grammar's nouns are ignored, so model output that strays from the grammar is
    still scored: `caption_mentions("Two Stars, and a moon!")` is [("stars", "star"), ("moon", "moon")].
    """
    return [(w, NOUN_TO_KIND[w]) for w in _WORD.findall(text.lower()) if w in NOUN_TO_KIND]


def mentioned_kinds(text: str) -> list[str]:
    """The kinds of `caption_mentions(text)`, one entry per mention."""
    return [kind for _, kind in caption_mentions(text)]
