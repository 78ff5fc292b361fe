"""CHAIR: objects a description mentions that are not in the image (Rohrbach et al., 2018).

An image's ground-truth objects are the COCO classes of its instance annotations plus the classes
its reference captions mention. A description's mentions are found the way the reference
evaluation finds them: lower-case, tokenise, singularise, merge two-word phrases ("hot dog",
"baby bird" -> "bird"), drop "seat" when "toilet" is there, then look words up in the synonym list
(`coco_objects`). Over a set of descriptions:

    CHAIR_S = descriptions with >= 1 hallucinated mention / descriptions
    CHAIR_I = hallucinated mentions / all mentions of COCO objects
    recall  = ground-truth classes mentioned / ground-truth classes (summed over images)
    length  = mean number of tokens (words and punctuation, a merged phrase counting once)

Differences from the NLTK-based reference, which needs corpora we cannot download: tokens come from
a regular expression close to NLTK's Treebank tokenizer (punctuation and "'s" split off, hyphenated
words kept whole), and words are singularised with lemminflect's noun lemmas (its data ships in its
wheel). That is the singularisation of the original CHAIR code; the POS-tagged lemmatiser of later
forks also turns verb forms such as "skiing" into "ski", which we do not. `tests/test_eval_chair.py`
pins the behaviour on hand-checked captions.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rcpp_hf.eval.coco_objects import TWO_WORD_PHRASES, word_to_class
from rcpp_hf.eval.harness import (
    EvalItem,
    RunOptions,
    check_prompt_template,
    run_quality_eval,
)

DEFAULT_PROMPT = "Please describe this image in detail."
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_NUM_IMAGES = 500
ANNOTATION_FILES = ("instances_val2014.json", "captions_val2014.json")

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*|'[a-z]*|[^\sa-z0-9]")
_WORD_TO_CLASS = word_to_class()


@functools.lru_cache(maxsize=65536)
def singularize(token: str) -> str:
    """The noun lemma of an alphabetic token ("dogs" -> "dog", "mice" -> "mouse"); other tokens unchanged."""
    from lemminflect import getLemma

    if not token.isalpha():
        return token
    lemmas = getLemma(token, upos="NOUN")
    return lemmas[0] if lemmas else token


def caption_words(caption: str) -> list[str]:
    """The caption as CHAIR reads it: lower-cased tokens, singularised, two-word phrases merged."""
    words = [singularize(token) for token in _TOKEN.findall(caption.lower())]
    merged = []
    index = 0
    while index < len(words):
        pair = " ".join(words[index : index + 2])
        if pair in TWO_WORD_PHRASES:
            merged.append(TWO_WORD_PHRASES[pair])
            index += 2
        else:
            merged.append(words[index])
            index += 1
    return merged


def caption_mentions(words: list[str]) -> list[tuple[str, str]]:
    """(word, COCO class) for every word naming a COCO object, in caption order."""
    if "toilet" in words:  # "the seat of the toilet" is no chair
        words = [word for word in words if word != "seat"]
    return [(word, _WORD_TO_CLASS[word]) for word in words if word in _WORD_TO_CLASS]


@dataclass(frozen=True)
class CaptionScore:
    mentions: list[tuple[str, str]]  # (word, class), every mention
    hallucinated: list[tuple[str, str]]  # the mentions whose class is not in the image
    recalled: list[str]  # ground-truth classes mentioned, sorted
    ground_truth: list[str]  # sorted
    length: int  # tokens


def coco_mentions(caption: str) -> list[tuple[str, str]]:
    """(word, COCO class) for every mention of a COCO object in the caption, as CHAIR reads it."""
    return caption_mentions(caption_words(caption))


def score_caption(
    caption: str, ground_truth: set[str], mentions: Callable[[str], list[tuple[str, str]]] = coco_mentions
) -> CaptionScore:
    """CHAIR's score of one caption against the image's classes. `mentions` is the vocabulary: the caption's
    (word, class) mentions in order (default COCO's synonym list; ShapesWorld passes its grammar's nouns). The
    length is CHAIR's token count whatever the vocabulary."""
    found = mentions(caption)
    return CaptionScore(
        mentions=found,
        hallucinated=[(word, name) for word, name in found if name not in ground_truth],
        recalled=sorted({name for _, name in found if name in ground_truth}),
        ground_truth=sorted(ground_truth),
        length=len(caption_words(caption)),
    )


def chair_metrics(scores: list[CaptionScore]) -> dict:
    """CHAIR_S, CHAIR_I, recall and length (fractions, not percentages) over descriptions, with their counts."""
    n = len(scores)
    mentions = sum(len(score.mentions) for score in scores)
    hallucinated = sum(len(score.hallucinated) for score in scores)
    ground_truth = sum(len(score.ground_truth) for score in scores)
    recalled = sum(len(score.recalled) for score in scores)
    return {
        "chair_s": sum(bool(score.hallucinated) for score in scores) / n if n else 0.0,
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "recall": recalled / ground_truth if ground_truth else 0.0,
        "length": sum(score.length for score in scores) / n if n else 0.0,
        "n_captions": n,
        "n_mentions": mentions,
        "n_hallucinated_mentions": hallucinated,
    }


class CocoAnnotations:
    """COCO 2014 val annotations read with pycocotools: image files and each image's ground-truth classes."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        paths = [folder / name for name in ANNOTATION_FILES]
        missing = [path for path in paths if not path.is_file()]
        if missing:
            present = sorted(path.name for path in folder.glob("*.json")) if folder.is_dir() else []
            raise FileNotFoundError(
                f"not a COCO 2014 annotations folder: {', '.join(map(str, missing))} not found"
                + (f" (it has {', '.join(present[:6])})" if present else "")
            )
        self.instances = _load_coco(paths[0], required=("images", "annotations", "categories"))
        self.captions = _load_coco(paths[1], required=("images", "annotations"))
        unknown = sorted({cat["name"] for cat in self.instances.cats.values()} - set(_WORD_TO_CLASS))
        if unknown:
            raise ValueError(f"{paths[0]}: categories that are not COCO's 80 classes: {unknown[:5]}")

    def image_ids(self) -> list[int]:
        return sorted(self.instances.imgs)

    def sample_image_ids(self, num_images: int, seed: int) -> list[int]:
        """A fixed, seeded sample of the annotated images, sorted."""
        ids = self.image_ids()
        if num_images > len(ids):
            raise ValueError(f"asked for {num_images} images, the annotations have {len(ids)}")
        return sorted(random.Random(seed).sample(ids, num_images))

    def file_name(self, image_id: int) -> str:
        if image_id not in self.instances.imgs:
            raise ValueError(f"image id {image_id} is not in {ANNOTATION_FILES[0]}")
        return self.instances.imgs[image_id]["file_name"]

    def objects(self, image_id: int) -> set[str]:
        """The classes of the image's instance annotations and those its reference captions mention."""
        classes = {self.instances.cats[ann["category_id"]]["name"] for ann in self.instances.imgToAnns[image_id]}
        for ann in self.captions.imgToAnns[image_id]:
            classes.update(name for _, name in caption_mentions(caption_words(ann["caption"])))
        return classes


def _load_coco(path: Path, required: tuple[str, ...]):
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a COCO annotation file ({error!r})") from None
    missing = [key for key in required if key not in coco.dataset]
    if missing:
        raise ValueError(f"{path}: not a COCO annotation file of this kind (missing {', '.join(missing)})")
    return coco


def read_image_ids(path: str | Path) -> list[int]:
    """One COCO image id per line."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        return [int(line) for line in lines]
    except ValueError:
        raise ValueError(f"{path}: expected one integer COCO image id per line") from None


def summarize_chair(records: list[dict]) -> dict:
    scores = [
        CaptionScore(
            mentions=[tuple(m) for m in r["mentions"]],
            hallucinated=[tuple(m) for m in r["hallucinated"]],
            recalled=r["recalled"],
            ground_truth=r["ground_truth"],
            length=r["length"],
        )
        for r in records
    ]
    metrics = chair_metrics(scores)
    headline = {key: metrics[key] for key in ("chair_s", "chair_i", "recall", "length")}
    return {**metrics, "headline": headline}


def evaluate_chair(
    image_folder: str | Path,
    annotations: str | Path,
    options: RunOptions,
    num_images: int = DEFAULT_NUM_IMAGES,
    image_seed: int = 0,
    image_ids: list[int] | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> dict:
    """Describe `num_images` seeded COCO val2014 images (or `image_ids`) and score the descriptions."""
    check_prompt_template(prompt, fields=())
    coco = CocoAnnotations(annotations)
    ids = list(image_ids) if image_ids is not None else coco.sample_image_ids(num_images, image_seed)
    files = {image_id: Path(image_folder) / coco.file_name(image_id) for image_id in ids}
    ground_truth = {image_id: coco.objects(image_id) for image_id in ids}
    items = [
        EvalItem(str(image_id), prompt, files[image_id], {"image_id": image_id, "file_name": files[image_id].name})
        for image_id in ids
    ]

    def score(record: dict) -> dict:
        result = score_caption(record["answer"], ground_truth[record["image_id"]])
        return {
            "mentions": result.mentions,
            "hallucinated": result.hallucinated,
            "recalled": result.recalled,
            "ground_truth": result.ground_truth,
            "length": result.length,
        }

    inputs = {
        "image_folder": str(image_folder),
        "annotations": str(annotations),
        "image_seed": image_seed if image_ids is None else None,
        "image_ids": ids,
    }
    return run_quality_eval(
        "chair",
        items,
        options,
        inputs=inputs,
        user_prompt=prompt,
        default_max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
        score=score,
        summarize=summarize_chair,
    )
