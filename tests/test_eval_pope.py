import pytest
from PIL import Image

from rcpp_hf.eval.pope import (
    PopeParquet,
    parse_yes_no,
    pope_metrics,
    question_format,
    read_pope_json_lines,
    summarize_pope,
)
from tests.eval_helpers import write_pope_parquet


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("There is no dog.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("The dog is not visible", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # only the exact words No / not / no
        ("NO", "yes"),  # case-sensitive, as in the official script
        ("No.There is", "no"),
        ("", "yes"),
        ("I cannot tell", "yes"),
        ("There is a dog, not a cat.", "no"),  # the comma is dropped, "not" is a word
    ],
)
def test_parse_yes_no_matches_the_official_rule(text, expected):
    assert parse_yes_no(text) == expected


def test_pope_metrics_against_hand_counts():
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "yes"]
    predictions = ["yes", "no", "yes", "yes", "no", "no", "yes", "yes"]
    # tp = 3 (0, 2, 7), fn = 1 (1), fp = 2 (3, 6), tn = 2 (4, 5)
    metrics = pope_metrics(labels, predictions)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"], metrics["n"]) == (3, 1, 2, 2, 8)
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["precision"] == pytest.approx(3 / 5)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(5 / 8)


def test_pope_metrics_when_nothing_is_predicted_yes():
    metrics = pope_metrics(["yes", "no"], ["no", "no"])
    assert metrics["accuracy"] == 0.5
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == metrics["yes_ratio"] == 0.0


def test_pope_metrics_rejects_bad_values():
    with pytest.raises(ValueError, match="differ in length"):
        pope_metrics(["yes"], [])
    with pytest.raises(ValueError, match="predictions must be 'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


POPE_SPLITS = ["random", "popular", "adversarial"]


def check_pope_file(path, questions_per_split):
    """The official file's shape: 6 questions per image, half "yes", COCO val2014 images, one id each."""
    questions = read_pope_json_lines(path)
    assert len(questions) == questions_per_split
    assert len({q.id for q in questions}) == questions_per_split
    assert len({q.image for q in questions}) == questions_per_split // 6
    assert sum(q.label == "yes" for q in questions) == questions_per_split // 2
    first = questions[0]
    assert first.split == path.stem
    assert first.image.startswith("COCO_val2014_") and first.question.endswith("in the image?")
    always_yes = pope_metrics([q.label for q in questions], ["yes"] * questions_per_split)
    assert (always_yes["accuracy"], always_yes["precision"], always_yes["recall"]) == (0.5, 0.5, 1.0)
    assert always_yes["yes_ratio"] == 1.0
    return questions


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_excerpt(pope_data, split):
    check_pope_file(pope_data / f"coco_pope_{split}.json", 60)


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_full_pope_files_begin_with_the_excerpt(full_pope_data, pope_data, split):
    name = f"coco_pope_{split}.json"
    check_pope_file(full_pope_data / name, 3000)
    excerpt = (pope_data / name).read_text().splitlines()
    assert (full_pope_data / name).read_text().splitlines()[:60] == excerpt


def test_read_pope_json_lines_names_the_bad_line(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"questions.json, line 2: not a POPE question \(missing image, text, label\)"):
        read_pope_json_lines(path)
    path.write_text('[{"question_id": 1}]')
    with pytest.raises(ValueError, match="line 1: expected a JSON object per line"):
        read_pope_json_lines(path)


def test_summarize_pope_per_split_and_mean_over_splits():
    records = [
        {"split": "adversarial", "label": "yes", "prediction": "yes"},
        {"split": "adversarial", "label": "no", "prediction": "yes"},
        {"split": "random", "label": "yes", "prediction": "yes"},
        {"split": "random", "label": "no", "prediction": "no"},
        {"split": "random", "label": "no", "prediction": "no"},
        {"split": "random", "label": "yes", "prediction": "no"},
    ]
    summary = summarize_pope(records)
    assert list(summary["splits"]) == ["adversarial", "random"]
    assert summary["splits"]["adversarial"]["accuracy"] == 0.5
    assert summary["splits"]["random"]["accuracy"] == 0.75
    assert summary["average"]["accuracy"] == pytest.approx(0.625)  # unweighted over splits, not 4/6
    assert summary["average"]["yes_ratio"] == pytest.approx((1.0 + 0.25) / 2)
    assert summary["headline"] == {
        "accuracy": summary["average"]["accuracy"],
        "f1": summary["average"]["f1"],
        "yes_ratio": summary["average"]["yes_ratio"],
    }


def test_question_format(tmp_path):
    (tmp_path / "questions.jsonl").write_text("")
    (tmp_path / "questions.csv").write_text("")
    (tmp_path / "data").mkdir()
    assert question_format(tmp_path / "questions.jsonl") == "json-lines"
    assert question_format(tmp_path / "data") == "parquet"
    assert question_format("lmms-lab/POPE") == "parquet"
    with pytest.raises(ValueError, match=r"questions.csv: unknown question-file format"):
        question_format(tmp_path / "questions.csv")
    with pytest.raises(FileNotFoundError, match="question file not found: .*missing.json"):
        question_format(tmp_path / "missing.json")


def test_lmms_lab_parquet_layout(tmp_path, make_image_files):
    image_path = make_image_files(tmp_path / "images", ["COCO_val2014_000000000042.jpg"])[0]
    rows = [
        ("1", "Is there a dog in the image?", "yes", "COCO_val2014_000000000042", "adversarial"),
        ("2", "Is there a cat in the image?", "No", "COCO_val2014_000000000042", "adversarial"),
        ("1", "Is there a dog in the image?", "yes", "COCO_val2014_000000000042", "random"),
    ]
    write_pope_parquet(tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet", rows, image_path.read_bytes())
    parquet = PopeParquet(tmp_path / "POPE")
    assert [q.id for q in parquet.questions] == ["adversarial/1", "adversarial/2", "random/1"]
    assert [q.label for q in parquet.questions] == ["yes", "no", "yes"]
    assert parquet.questions[0].image == "COCO_val2014_000000000042"
    image = parquet.image(2)
    assert image.size == (40, 30) and image.tobytes() == Image.open(image_path).tobytes()


def test_parquet_without_the_pope_columns_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["Is there a dog?"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(ValueError, match=r"other.parquet: not the lmms-lab/POPE layout \(missing columns question_id, answer, image, category\)"):
        PopeParquet(tmp_path / "other.parquet")
