"""The MME-style set: one yes and one no question per image and subtask, written in MME's layout,
read back by the MME loader and scored by its scorer (hand-counted)."""

import re
from collections import Counter

import pytest

from rcpp_hf.cli import main
from rcpp_hf.eval.mme import HALLUCINATION, mme_scores, parse_mme_answer, read_mme
from rcpp_hf.shapesworld.mme_sets import (
    MME_FOLDER,
    MME_INSTRUCTION,
    mme_questions,
    mme_scenes,
    write_mme_set,
)
from rcpp_hf.shapesworld.world import KINDS, Scene, ShapeObject


def test_export_reads_back_through_the_mme_loader(tmp_path):
    assert main(["shapesworld", "export", "--output-dir", str(tmp_path), "--seed", "7", "--num-images", "3"]) == 0
    scenes = mme_scenes(7, 3)
    questions = read_mme(tmp_path / MME_FOLDER, HALLUCINATION)
    assert [q.id for q in questions] == [f"{t}/{s.name}/{i}" for t in HALLUCINATION for s in scenes for i in (0, 1)]
    assert [q.label for q in questions] == ["yes", "no"] * 12
    for q in questions:
        assert q.image == tmp_path / MME_FOLDER / q.subtask / f"{q.image.stem}.png"
        assert q.question.endswith(MME_INSTRUCTION)
    expected = [question for t in HALLUCINATION for s in scenes for question, _ in mme_questions(s)[t]]
    assert [q.question_without_instruction for q in questions] == expected
    for name in ("shapesworld_pope_random.json", "shapesworld_pope_adversarial.json", "shapesworld_captions.jsonl"):
        assert (tmp_path / name).is_file()  # the POPE sets and captions beside it, as before


def test_scores_of_the_read_back_set_hand_counted(tmp_path):
    questions = read_mme(write_mme_set(mme_scenes(7, 2), tmp_path), HALLUCINATION)
    # Answers per subtask, in file order (image 1: yes-question, no-question; image 2: the same).
    answers = {
        "existence": ["Yes", "No", "Yes", "No"],  # all right: acc 1, acc+ 1, score 200
        "count": ["Yes", "Yes", "No", "No"],  # right, wrong, wrong, right: acc 0.5, acc+ 0, score 50
        "position": ["Yes", "No", "maybe", "No"],  # "maybe" is "other", wrong: acc 0.75, acc+ 0.5, score 125
        "color": ["No", "Yes", "No", "Yes"],  # all wrong: score 0
    }
    records = [{"subtask": q.subtask, "image": q.image.name, "label": q.label,
                "prediction": parse_mme_answer(answers[q.subtask][i % 4])} for i, q in enumerate(questions)]  # fmt: skip
    scores = mme_scores(records)
    got = {t: (s["acc"], s["acc_plus"], s["score"]) for t, s in scores["subtasks"].items()}
    assert got == {"existence": (1.0, 1.0, 200.0), "count": (0.5, 0.0, 50.0), "position": (0.75, 0.5, 125.0),
                   "color": (0.0, 0.0, 0.0)}  # fmt: skip
    assert scores["totals"]["hallucination"] == {"score": 375.0, "complete": True}


def test_questions_of_a_hand_built_scene():
    scene = Scene(0, 0, (ShapeObject("star", "red", "normal", 0, 0, 26.7, 26.7),
                         ShapeObject("moon", "blue", "normal", 2, 2, 133.3, 133.3)))  # fmt: skip
    pairs = mme_questions(scene)
    assert list(pairs) == list(HALLUCINATION)
    assert [answer for pair in pairs.values() for _, answer in pair] == ["Yes", "No"] * 4
    (yes, _), (no, _) = pairs["color"]
    assert yes in ("Is the star red?", "Is the moon blue?") and no != yes
    (yes, _), (no, _) = pairs["count"]
    assert yes in ("Is there one star in the image?", "Is there one moon in the image?")
    assert no.startswith("Is there one ") and no[13:-14] not in ("star", "moon")  # a kind the scene does not hold
    assert mme_questions(scene) == pairs  # the scene's own random streams: deterministic


def test_scenes_need_a_kind_held_once():
    scenes = mme_scenes(2, 30)
    assert scenes == mme_scenes(2, 30)
    twins = Scene(0, 0, (ShapeObject("star", "red", "normal", 0, 0, 26.7, 26.7),
                         ShapeObject("star", "red", "normal", 2, 2, 133.3, 133.3)))  # fmt: skip
    with pytest.raises(ValueError, match="position / color"):
        mme_questions(twins)


def test_wording_without_the_kinds_does_not_tell_the_answer():
    # A blind reader that knows, for each question with its nouns masked ("Is there one K in the image?"), the
    # answer most often right over the set scores near chance: only the kinds carry the world's priors.
    # (Off-by-one count claims scored 0.896 blind on these scenes: "Are there two K" was nearly always "No".)
    nouns = re.compile("|".join(sorted([*KINDS, *KINDS.values()], key=len, reverse=True)))
    answers = {}
    for scene in mme_scenes(5, 400):
        for subtask, pair in mme_questions(scene).items():
            for question, answer in pair:
                answers.setdefault(subtask, Counter())[(nouns.sub("K", question), answer)] += 1
    for subtask, counts in answers.items():
        masked = {question for question, _ in counts}
        blind = sum(max(counts[(q, "Yes")], counts[(q, "No")]) for q in masked) / sum(counts.values())
        assert blind <= 0.55, subtask
