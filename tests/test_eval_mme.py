import pytest

from rcpp_hf.eval.mme import mme_scores, parse_mme_answer, read_mme
from tests.eval_helpers import write_mme


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, there is", "yes"),
        ("Not really", "no"),  # "no" within the first four characters
        ("Nothing", "no"),
        ("The answer is yes", "other"),
        ("", "other"),
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def record(subtask, image, label, answer):
    return {"subtask": subtask, "image": image, "label": label, "prediction": parse_mme_answer(answer)}


def test_mme_scores_against_a_hand_made_example():
    records = [
        record("existence", "a.jpg", "yes", "Yes"),
        record("existence", "a.jpg", "no", "No, there is not."),  # image a: both right
        record("existence", "b.jpg", "yes", "Not sure"),  # read as "no": wrong
        record("existence", "b.jpg", "no", "no"),
        record("count", "c.jpg", "yes", "I think yes"),  # "other": wrong
        record("count", "c.jpg", "no", "Nope"),
        record("code_reasoning", "d.png", "yes", "Yes"),
        record("code_reasoning", "d.png", "no", "No"),
    ]
    scores = mme_scores(records)
    existence = scores["subtasks"]["existence"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (0.75, 0.5, 125.0)
    assert (existence["n_questions"], existence["n_images"]) == (4, 2)
    count = scores["subtasks"]["count"]
    assert (count["acc"], count["acc_plus"], count["score"]) == (0.5, 0.0, 50.0)
    assert scores["subtasks"]["code_reasoning"]["score"] == 200.0
    assert scores["totals"]["perception"] == {"score": 175.0, "complete": False}
    assert scores["totals"]["cognition"] == {"score": 200.0, "complete": False}
    assert scores["totals"]["hallucination"] == {"score": 175.0, "complete": False}
    assert scores["headline"] == {"perception": 175.0, "cognition": 200.0, "hallucination": 175.0}


def test_read_mme_both_layouts(tmp_path, make_image_files):
    root = write_mme(tmp_path / "MME", make_image_files)
    questions = read_mme(root, ("existence", "artwork"))
    assert [q.id for q in questions] == [
        "existence/a/0", "existence/a/1", "existence/b/0", "existence/b/1", "artwork/x/0", "artwork/x/1",
    ]
    assert questions[2].image == root / "existence" / "b.png"
    assert questions[4].image == root / "artwork" / "images" / "x.jpg"
    assert [q.label for q in questions] == ["yes", "no", "yes", "no", "no", "yes"]
    # LLaVA-1.5 asks without MME's own instruction (also when it follows a double space)
    assert questions[0].question_without_instruction == "Is there a dog in this image?"
    assert questions[1].question_without_instruction == "Is there a cat in this image?"
    assert questions[4].question_without_instruction == "Is this painted by Monet?"


def test_read_mme_names_bad_input(tmp_path, make_image_files):
    root = write_mme(tmp_path / "MME", make_image_files)
    with pytest.raises(FileNotFoundError, match=r"MME.count: MME subtask folder not found"):
        read_mme(root, ("existence", "count"))
    with pytest.raises(ValueError, match="unknown MME subtasks"):
        read_mme(root, ("existance",))
    (root / "existence" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b.txt: its image b.jpg/.png is not in"):
        read_mme(root, ("existence",))
    make_image_files(root / "existence", ["b.png"])
    (root / "existence" / "a.txt").write_text("Is there a dog?\tMaybe\n")
    with pytest.raises(ValueError, match=r"a.txt, line 1: expected 'question<TAB>Yes\|No'"):
        read_mme(root, ("existence",))
    (root / "existence" / "a.txt").write_text("Is there a dog?\tYes\n")
    with pytest.raises(ValueError, match="a.txt: MME has two questions per image, this file has 1"):
        read_mme(root, ("existence",))
