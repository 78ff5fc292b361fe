"""MME: two yes/no questions per image over 14 subtasks, scored as the official eval_tool scores them.

Folder layout (MME_Benchmark_release_version/): one folder per subtask. Five of them (artwork,
celebrity, landmark, posters, scene) keep images in `images/` and questions in
`questions_answers_YN/`; the others keep both side by side. Each question file `<image stem>.txt`
holds two lines "question<TAB>Yes|No" about the image of the same stem.

Scoring: an answer is lower-cased; "yes"/"no" as is, else "yes" if its first four characters contain
"yes", else "no" if they contain "no", else "other" (always wrong). Per subtask, acc = share of
questions right, acc+ = share of images with both questions right, score = 100 * acc + 100 * acc+
(max 200). Perception sums 10 subtasks (max 2000), cognition 4 (max 800); the hallucination subset
is existence, count, position and color (max 800).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rcpp_hf.eval.harness import (
    EvalItem,
    RunOptions,
    check_prompt_template,
    run_quality_eval,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
HALLUCINATION = ("existence", "count", "position", "color")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
# LLaVA-1.5's MME prompt: the question without MME's own "Please answer yes or no.", then LLaVA's
# short-answer instruction. "{question} Please answer yes or no." gives MME's original wording.
DEFAULT_PROMPT = "{question}\nAnswer the question using a single word or phrase."
DEFAULT_MAX_NEW_TOKENS = 128
_YES_NO_INSTRUCTION = re.compile(r"\s*Please answer yes or no\.\s*$")


@dataclass(frozen=True)
class MMEQuestion:
    id: str  # "<subtask>/<image stem>/<0|1>"
    subtask: str
    image: Path
    question: str  # as in the question file
    label: str  # "yes" | "no"

    @property
    def question_without_instruction(self) -> str:
        return _YES_NO_INSTRUCTION.sub("", self.question)


def read_mme(root: str | Path, subtasks: tuple[str, ...] = SUBTASKS) -> list[MMEQuestion]:
    """All questions of `subtasks` under the MME root folder, in subtask then file-name order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder not found: {root}")
    unknown = [name for name in subtasks if name not in SUBTASKS]
    if unknown:
        raise ValueError(f"unknown MME subtasks {unknown}; MME has {list(SUBTASKS)}")
    questions = []
    for subtask in subtasks:
        folder = root / subtask
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: MME subtask folder not found (is {root} MME_Benchmark_release_version?)")
        split_layout = (folder / "images").is_dir()
        image_folder = folder / "images" if split_layout else folder
        question_folder = folder / "questions_answers_YN" if split_layout else folder
        question_files = sorted(question_folder.glob("*.txt"))
        if not question_files:
            raise ValueError(f"{question_folder}: no question files (.txt)")
        for path in question_files:
            image = next((image_folder / (path.stem + s) for s in IMAGE_SUFFIXES if (image_folder / (path.stem + s)).is_file()), None)
            if image is None:
                raise FileNotFoundError(f"{path}: its image {path.stem}.jpg/.png is not in {image_folder}")
            rows = _read_question_file(path)
            for index, (question, label) in enumerate(rows):
                questions.append(MMEQuestion(f"{subtask}/{path.stem}/{index}", subtask, image, question, label))
    return questions


def _read_question_file(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            raise ValueError(f"{path}, line {line_number}: expected 'question<TAB>Yes|No'")
        rows.append((fields[0], fields[1].strip().lower()))
    if len(rows) != 2:
        raise ValueError(f"{path}: MME has two questions per image, this file has {len(rows)}")
    return rows


def parse_mme_answer(text: str) -> str:
    """"yes", "no" or "other", exactly as MME's eval_tool reads an answer."""
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer
    if "yes" in answer[:4]:
        return "yes"
    if "no" in answer[:4]:
        return "no"
    return "other"


def mme_scores(records: list[dict]) -> dict:
    """Per-subtask acc, acc+ and score, and the perception / cognition / hallucination totals.

    Each record has "subtask", "image", "label" and "prediction". A total over a group with missing
    subtasks is marked incomplete.
    """
    by_subtask: dict[str, dict[str, list[bool]]] = {}
    for record in records:
        images = by_subtask.setdefault(record["subtask"], {})
        images.setdefault(record["image"], []).append(record["prediction"] == record["label"])
    subtasks = {}
    for subtask, images in by_subtask.items():
        answers = [right for image in images.values() for right in image]
        accuracy = sum(answers) / len(answers)
        accuracy_plus = sum(all(image) for image in images.values()) / len(images)
        subtasks[subtask] = {
            "acc": accuracy,
            "acc_plus": accuracy_plus,
            "score": 100 * accuracy + 100 * accuracy_plus,
            "n_questions": len(answers),
            "n_images": len(images),
        }
    totals = {
        group: {
            "score": sum(subtasks[name]["score"] for name in names if name in subtasks),
            "complete": all(name in subtasks for name in names),
        }
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION), ("hallucination", HALLUCINATION))
    }
    headline = {group: total["score"] for group, total in totals.items()}
    return {"subtasks": subtasks, "totals": totals, "headline": headline}


def mme_table_metrics(records: list[dict]) -> dict:
    """`mme_scores` with flat copies for tables: each subtask's accuracy (`<subtask>_acc`) and `score`, the
    hallucination total (max 800)."""
    metrics = mme_scores(records)
    metrics |= {f"{name}_acc": scores["acc"] for name, scores in metrics["subtasks"].items()}
    metrics["score"] = metrics["headline"]["hallucination"]
    return metrics


def evaluate_mme(
    mme_root: str | Path,
    options: RunOptions,
    subtasks: tuple[str, ...] = SUBTASKS,
    prompt: str = DEFAULT_PROMPT,
) -> dict:
    """Ask every MME question of `subtasks` and score the answers; returns the metrics."""
    check_prompt_template(prompt, fields=("question",))
    questions = read_mme(mme_root, subtasks)
    items = [
        EvalItem(
            q.id,
            prompt.format(question=q.question_without_instruction),
            q.image,
            {"subtask": q.subtask, "image": q.image.name, "question": q.question, "label": q.label},
        )
        for q in questions
    ]
    return run_quality_eval(
        "mme",
        items,
        options,
        inputs={"mme_root": str(mme_root), "subtasks": list(subtasks)},
        user_prompt=prompt,
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        score=lambda record: {"prediction": parse_mme_answer(record["answer"])},
        summarize=mme_scores,
    )
