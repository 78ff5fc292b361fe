"""POPE-style question sets on ShapesWorld scenes, built the way POPE builds them on COCO.

For each image (a scene with at least 3 distinct kinds), 3 present kinds are asked about (answer
"yes", the same kinds in every split) and 3 absent kinds (answer "no"), chosen

- random: uniformly among the absent kinds;
- popular: the absent kinds most frequent over the set's scenes;
- adversarial: the absent kinds that co-occur most often with the image's kinds over the set's
  scenes (so a lone star's absent moon comes first).

Questions alternate yes / no per image, as in the POPE files. They are written in the official POPE
JSON-lines format ({"question_id", "image", "text", "label"}) beside the rendered images, so the
general POPE evaluation reads them like the COCO ones.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from rcpp_hf.shapesworld.questions import question_text
from rcpp_hf.shapesworld.render import IMAGE_FOLDER, write_images
from rcpp_hf.shapesworld.world import KINDS, Scene, WorldConfig, iter_scenes

POPE_SPLITS = ("random", "popular", "adversarial")
QUESTIONS_PER_LABEL = 3


@dataclass(frozen=True)
class KindStatistics:
    """Counts over a set of scenes: scenes holding each kind, and each ordered pair of kinds."""

    frequency: Counter
    co_occurrence: Counter  # (a, b) -> scenes holding both, a != b

    @classmethod
    def of(cls, scenes: list[Scene]) -> "KindStatistics":
        frequency, co_occurrence = Counter(), Counter()
        for scene in scenes:
            frequency.update(scene.kinds)
            co_occurrence.update((a, b) for a in scene.kinds for b in scene.kinds if a != b)
        return cls(frequency, co_occurrence)


def pope_scenes(seed: int, num_images: int, config: WorldConfig = WorldConfig()) -> list[Scene]:
    """The first `num_images` scenes of world `seed` that hold at least 3 distinct kinds."""
    return list(islice((s for s in iter_scenes(seed, config) if len(s.kinds) >= QUESTIONS_PER_LABEL), num_images))


def absent_kinds(scene: Scene, split: str, stats: KindStatistics) -> list[str]:
    """The 3 absent kinds asked about in `split` (ties broken by the kinds' order in `KINDS`)."""
    absent = [k for k in KINDS if k not in scene.kinds]
    if split == "random":
        return scene.rng("pope-random").sample(absent, QUESTIONS_PER_LABEL)
    if split == "popular":
        score = {k: stats.frequency[k] for k in absent}
    elif split == "adversarial":
        score = {k: sum(stats.co_occurrence[(p, k)] for p in scene.kinds) for k in absent}
    else:
        raise ValueError(f"unknown POPE split {split!r}; splits are {POPE_SPLITS}")
    return sorted(absent, key=lambda k: -score[k])[:QUESTIONS_PER_LABEL]  # stable: KINDS order on ties


def present_kinds(scene: Scene) -> list[str]:
    """The 3 present kinds asked about (the same in every split)."""
    return scene.rng("pope-present").sample(sorted(scene.kinds), QUESTIONS_PER_LABEL)


def build_pope_questions(scenes: list[Scene], split: str) -> list[dict]:
    """POPE rows {"question_id", "image", "text", "label"}, 6 per scene, question ids from 1."""
    stats = KindStatistics.of(scenes)
    rows = []
    for scene in scenes:
        if len(scene.kinds) < QUESTIONS_PER_LABEL:
            raise ValueError(f"scene {scene.name} holds {len(scene.kinds)} kinds; POPE needs {QUESTIONS_PER_LABEL}")
        for yes, no in zip(present_kinds(scene), absent_kinds(scene, split, stats)):
            for kind, label in ((yes, "yes"), (no, "no")):
                rows.append({"question_id": len(rows) + 1, "image": scene.image_file, "text": question_text(kind), "label": label})
    return rows


def write_pope_split(
    scenes: list[Scene], split: str, output_dir: str | Path, config: WorldConfig = WorldConfig()
) -> Path:
    """Write `shapesworld_pope_<split>.json` (JSON lines) and the images under `output_dir/images`."""
    output_dir = Path(output_dir)
    write_images(scenes, output_dir / IMAGE_FOLDER, config)
    path = output_dir / f"shapesworld_pope_{split}.json"
    with open(path, "w", encoding="utf-8") as handle:
        for row in build_pope_questions(scenes, split):
            handle.write(json.dumps(row) + "\n")
    return path
