"""MME-style question sets on ShapesWorld scenes: MME's hallucination subtasks, in MME's folder layout.

MME asks two questions per image, one answered yes and one answered no, and its hallucination subset
is existence, count, position and color. Here every scene of the set gets, per subtask, the pair
that `questions.py` draws for it (`existence_pair`, `count_pair`, `position_pair`, `colour_pair`),
each from the scene's own random stream, so the set is a pure function of (seed, num_images).

Written as MME_Benchmark_release_version/ lays out those subtasks: `<root>/<subtask>/<stem>.png`
beside `<root>/<subtask>/<stem>.txt`, two lines "question Please answer yes or no.<TAB>Yes|No", so
`rcpp-hf eval mme --mme-root <root> --subtasks existence count position color` reads it like MME.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from rcpp_hf.shapesworld.questions import QuestionPair, colour_pair, count_pair, existence_pair, position_pair, single_objects
from rcpp_hf.shapesworld.render import write_images
from rcpp_hf.shapesworld.world import Scene, WorldConfig, iter_scenes

MME_FOLDER = "shapesworld_mme"  # the MME root inside an export folder
MME_INSTRUCTION = " Please answer yes or no."  # MME's own suffix; rcpp_hf.eval.mme strips it for LLaVA's prompt
PAIR_OF_SUBTASK = {"existence": existence_pair, "count": count_pair, "position": position_pair, "color": colour_pair}


def mme_scenes(seed: int, num_images: int, config: WorldConfig = WorldConfig()) -> list[Scene]:
    """The first `num_images` scenes of world `seed` holding a kind exactly once (colour and position need one)."""
    return list(islice((s for s in iter_scenes(seed, config) if single_objects(s)), num_images))


def mme_questions(scene: Scene) -> dict[str, QuestionPair]:
    """Per subtask, the (yes, no) question pair asked about `scene`."""
    pairs = {subtask: pair(scene, scene.rng(f"mme-{subtask}")) for subtask, pair in PAIR_OF_SUBTASK.items()}
    missing = [subtask for subtask, pair in pairs.items() if pair is None]
    if missing:
        raise ValueError(f"scene {scene.name} supports no {' / '.join(missing)} question (it holds no kind exactly once)")
    return pairs


def write_mme_set(scenes: list[Scene], output_dir: str | Path, config: WorldConfig = WorldConfig()) -> Path:
    """Write the set in MME's layout under `output_dir/shapesworld_mme`; returns that root."""
    root = Path(output_dir) / MME_FOLDER
    questions = {scene.name: mme_questions(scene) for scene in scenes}
    for subtask in PAIR_OF_SUBTASK:
        folder = write_images(scenes, root / subtask, config)
        for scene in scenes:
            lines = [f"{question}{MME_INSTRUCTION}\t{answer}\n" for question, answer in questions[scene.name][subtask]]
            (folder / f"{scene.name}.txt").write_text("".join(lines), encoding="utf-8")
    return root
