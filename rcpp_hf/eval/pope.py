"""POPE: yes/no object-existence questions, the official answer parser and its metrics.

Conventions reproduced from the POPE authors' evaluation and LLaVA's `eval_pope.py`:
the answer is cut at its first '.', commas are dropped, the rest is split on single spaces, and
the prediction is "no" when one of the words is exactly "No", "not" or "no", else "yes".
Metrics take "yes" as the positive class; `yes_ratio` is the share of *predictions* that are "yes".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

YES, NO = "yes", "no"
_NEGATION_WORDS = ("No", "not", "no")


def parse_yes_no(text: str) -> str:
    """Map a free-form answer to "yes" or "no" exactly as the official POPE evaluation does."""
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return NO if any(word in _NEGATION_WORDS for word in words) else YES


def pope_metrics(labels: list[str], predictions: list[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" positive), yes-ratio of predictions, n and the counts.

    A ratio whose denominator is zero (e.g. precision when nothing is predicted "yes") is 0.0.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"labels and predictions differ in length: {len(labels)} != {len(predictions)}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        unknown = sorted(set(values) - {YES, NO})
        if unknown:
            raise ValueError(f"{name} must be 'yes' or 'no', got {unknown[:5]}")
    pairs = list(zip(labels, predictions))
    tp = sum(label == YES and pred == YES for label, pred in pairs)
    fp = sum(label == NO and pred == YES for label, pred in pairs)
    tn = sum(label == NO and pred == NO for label, pred in pairs)
    fn = sum(label == YES and pred == NO for label, pred in pairs)
    n = len(pairs)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question; `id` ("<split>/<question_id>") is unique across the splits of a run."""

    id: str
    split: str
    question_id: int | str
    image: str  # file name in the image folder
    question: str
    label: str  # "yes" | "no"


def read_pope_json_lines(path: str | Path, split: str | None = None) -> list[PopeQuestion]:
    """Read an official POPE question file (JSON lines with question_id, image, text, label).

    `split` defaults to the file name's stem, e.g. "coco_pope_adversarial".
    """
    path = Path(path)
    split = split or path.stem
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{where}: not JSON lines; a POPE question file has one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            missing = [key for key in ("question_id", "image", "text", "label") if key not in row]
            if missing:
                raise ValueError(f"{where}: not a POPE question (missing {', '.join(missing)})")
            questions.append(_question(where, split, row["question_id"], row["image"], row["text"], row["label"]))
    if not questions:
        raise ValueError(f"{path}: no questions in the file")
    return questions


def _question(where: str, split: str, question_id, image: str, text: str, label: str) -> PopeQuestion:
    label = str(label).strip().lower()
    if label not in (YES, NO):
        raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
    return PopeQuestion(f"{split}/{question_id}", split, question_id, image, text, label)
