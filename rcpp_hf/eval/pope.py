"""POPE: yes/no object-existence questions, the official answer parser and metrics, and `rcpp-hf eval pope`.

Questions come in the authors' JSON-lines files (COCO images in a folder) or in the lmms-lab/POPE
parquet layout (images inside); each file's questions form a split, reported alone and averaged.

Conventions reproduced from the POPE authors' evaluation and LLaVA's `eval_pope.py`:
the answer is cut at its first '.', commas are dropped, the rest is split on single spaces, and
the prediction is "no" when one of the words is exactly "No", "not" or "no", else "yes".
Metrics take "yes" as the positive class; `yes_ratio` is the share of *predictions* that are "yes".
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from PIL import Image

from rcpp_hf.eval.harness import (
    EvalItem,
    RunOptions,
    check_prompt_template,
    run_quality_eval,
)

YES, NO = "yes", "no"
# LLaVA-1.5's POPE prompt; prompts move the baseline by points, so it is recorded with every run.
DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's model_vqa_loader default
JSON_LINES_SUFFIXES = (".json", ".jsonl")
PARQUET_COLUMNS = ("question_id", "question", "answer", "image", "category")
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


class PopeParquet:
    """POPE in the lmms-lab/POPE parquet layout, read with `datasets`; images stay in the files until asked for.

    Columns used: question_id, question, answer, category (the split) and image {bytes, path}.
    `source` is a .parquet file, a folder searched recursively for .parquet files, or a hub dataset id.
    """

    def __init__(self, source: str | Path, hub_split: str = "test"):
        import datasets

        if Path(source).exists():
            files = [Path(source)] if Path(source).is_file() else sorted(Path(source).rglob("*.parquet"))
            if not files:
                raise ValueError(f"{source}: no .parquet files in this folder (expected the lmms-lab/POPE layout)")
            dataset = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        else:
            dataset = datasets.load_dataset(str(source), split=hub_split)
        missing = [column for column in PARQUET_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(f"{source}: not the lmms-lab/POPE layout (missing columns {', '.join(missing)})")
        self.dataset = dataset.cast_column("image", datasets.Image(decode=False))
        rows = self.dataset.select_columns([column for column in dataset.column_names if column != "image"])
        self.questions = [
            _question(
                f"{source}, row {index}",
                row["category"],
                row["question_id"],
                row.get("image_source") or f"row {index}",
                row["question"],
                row["answer"],
            )
            for index, row in enumerate(rows)
        ]

    def image(self, index: int) -> Image.Image:
        image = Image.open(io.BytesIO(self.dataset[index]["image"]["bytes"]))
        image.load()
        return image


def pope_items(sources: list[str | Path], image_folder: str | Path | None, prompt: str = DEFAULT_PROMPT) -> list[EvalItem]:
    """Questions of every source (JSON lines or parquet, see `question_format`) as items, in order."""
    check_prompt_template(prompt, fields=("question",))
    items = []
    for source in sources:
        if question_format(source) == "json-lines":
            if image_folder is None:
                raise ValueError(f"{source}: POPE JSON-lines questions name COCO images; pass --image-folder (val2014/)")
            questions = read_pope_json_lines(source)
            images = [Path(image_folder) / q.image for q in questions]
        else:
            parquet = PopeParquet(source)
            questions = parquet.questions
            images = [functools.partial(parquet.image, index) for index in range(len(questions))]
        for question, image in zip(questions, images):
            fields = {
                "split": question.split,
                "question_id": question.question_id,
                "image": question.image,
                "question": question.question,
                "label": question.label,
            }
            items.append(EvalItem(question.id, prompt.format(question=question.question), image, fields))
    return items


def question_format(source: str | Path) -> str:
    """"json-lines" (the official files) or "parquet" (lmms-lab/POPE: a file, a folder or a hub id)."""
    path = Path(source)
    if path.is_file():
        if path.suffix in JSON_LINES_SUFFIXES:
            return "json-lines"
        if path.suffix == ".parquet":
            return "parquet"
        raise ValueError(
            f"{path}: unknown question-file format (expected POPE JSON lines .json/.jsonl, or lmms-lab/POPE .parquet)"
        )
    if path.is_dir():
        return "parquet"
    if path.suffix or str(source).count("/") != 1:
        raise FileNotFoundError(f"question file not found: {source}")
    return "parquet"  # "owner/name": a dataset on the hub


def summarize_pope(records: list[dict]) -> dict:
    """Metrics per split (in order of appearance) and their unweighted mean over splits.

    Each record has "split", "label" and "prediction" (the parsed answer).
    """
    by_split: dict[str, list[dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    splits = {
        split: pope_metrics([r["label"] for r in rows], [r["prediction"] for r in rows])
        for split, rows in by_split.items()
    }
    average = {key: mean(m[key] for m in splits.values()) for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    headline = {"accuracy": average["accuracy"], "f1": average["f1"], "yes_ratio": average["yes_ratio"]}
    return {"splits": splits, "average": average, "headline": headline}


def evaluate_pope(
    question_files: list[str | Path],
    image_folder: str | Path | None,
    options: RunOptions,
    prompt: str = DEFAULT_PROMPT,
) -> dict:
    """Run POPE on every question file (its splits reported separately and averaged); returns the metrics."""
    items = pope_items(question_files, image_folder, prompt)
    inputs = {
        "question_files": [str(f) for f in question_files],
        "image_folder": str(image_folder) if image_folder is not None else None,
    }
    return run_quality_eval(
        "pope",
        items,
        options,
        inputs=inputs,
        user_prompt=prompt,
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        score=lambda record: {"prediction": parse_yes_no(record["answer"])},
        summarize=summarize_pope,
    )
