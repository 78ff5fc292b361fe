"""ShapesWorld scenes as local lmms-eval tasks, in the formats of lmms-eval's own pope, mme, gqa, scienceqa_img and
textvqa tasks and scored by those tasks' own functions (`!function lmms_eval.tasks.<task>.utils...`), plus a
multiple-choice task (loglikelihood) in scienceqa's format. Offline: each task's data is a parquet file with the
images embedded, next to its YAML.

    python -m rcpp_hf.lmms_eval.shapesworld_tasks TASKS/ --num-images 17
    lmms-eval --model rcpp_hf --include_path TASKS/ --tasks shapesworld_pope --output_path runs/

Writing needs no lmms-eval; running the tasks does. Task names are `shapesworld_<format>` (`TASKS`).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import datasets

from rcpp_hf.shapesworld.mme_sets import mme_questions, mme_scenes
from rcpp_hf.shapesworld.pope_sets import build_pope_questions, pope_scenes
from rcpp_hf.shapesworld.questions import colour_question, count_of, count_question, single_objects
from rcpp_hf.shapesworld.render import render_scene
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED, KINDS, Scene

SPLIT = "test"
SHORT_ANSWER = "\\nAnswer the question using a single word or phrase."  # as YAML writes "\n"

# Per format: the task's YAML after `task`, `dataset_path` and `test_split`; the metric functions are lmms-eval's.
YAML = {
    "pope": """output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.pope.utils.pope_doc_to_visual
doc_to_text: !function lmms_eval.tasks.pope.utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs: {max_new_tokens: 8, temperature: 0, do_sample: false}
process_results: !function lmms_eval.tasks.pope.utils.pope_process_results
metric_list:
""" + "".join(f"""  - metric: pope_{name}
    aggregation: !function lmms_eval.tasks.pope.utils.pope_aggregate_{name}
    higher_is_better: true
""" for name in ("accuracy", "precision", "recall", "f1_score", "yes_ratio")) + f"""lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "{SHORT_ANSWER}"}}
""",
    "mme": f"""output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.mme.utils.mme_doc_to_visual
doc_to_text: !function lmms_eval.tasks.mme.utils.mme_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
process_results: !function lmms_eval.tasks.mme.utils.mme_process_results
metric_list:
  - metric: mme_perception_score
    aggregation: !function lmms_eval.tasks.mme.utils.mme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "{SHORT_ANSWER}"}}
""",
    # gqa's own process_docs loads its images from a second hub config: here they are in the rows already.
    "gqa": f"""output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.gqa.utils.gqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.gqa.utils.gqa_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, temperature: 0, do_sample: false}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "{SHORT_ANSWER}"}}
""",
    "scienceqa_img": """output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_text
doc_to_target: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_target
generation_kwargs: {max_new_tokens: 8, temperature: 0, do_sample: false}
process_results: !function lmms_eval.tasks.scienceqa.utils.sqa_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    format: default
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
""",
    # textvqa's submission metric writes a file into the working folder; its accuracy is exact_match.
    "textvqa": f"""output_type: generate_until
doc_to_visual: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.textvqa.utils.textvqa_doc_to_text
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 8, until: ["ASSISTANT:"]}}
process_results: !function lmms_eval.tasks.textvqa.utils.textvqa_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default: {{pre_prompt: "", post_prompt: "{SHORT_ANSWER}", ocr: false}}
""",
    # Multiple choice (loglikelihood): the shape words themselves are the choices, one token each.
    "choice": """output_type: multiple_choice
doc_to_visual: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_visual
doc_to_text: !function lmms_eval.tasks.scienceqa.utils.sqa_doc_to_text
doc_to_choice: choices
doc_to_target: target
metric_list:
  - metric: acc
lmms_eval_specific_kwargs:
  default: {format: default, pre_prompt: "", post_prompt: "\\nAnswer with the shape's name."}
""",
}
TASKS = tuple(f"shapesworld_{name}" for name in YAML)


def pope_rows(scenes: list[Scene]) -> list[dict]:
    """lmms-lab/POPE's columns: 6 questions per scene (3 present kinds, 3 absent), "yes" / "no"."""
    images = {scene.image_file: render_scene(scene) for scene in scenes}
    return [{"question_id": str(row["question_id"]), "question": row["text"], "answer": row["label"],
             "image": images[row["image"]], "category": "random"}
            for row in build_pope_questions(scenes, "random")]  # fmt: skip


def mme_rows(scenes: list[Scene]) -> list[dict]:
    """lmms-lab/MME's columns: per scene and subtask a yes and a no question on the same image (`question_id`)."""
    rows = []
    for scene in scenes:
        image = render_scene(scene)
        for subtask, pair in mme_questions(scene).items():
            for question, answer in pair:
                rows.append({"question_id": f"{subtask}/{scene.image_file}", "question": f"{question} Please answer "
                             "yes or no.", "answer": answer, "category": subtask, "image": image})  # fmt: skip
    return rows


def gqa_rows(scenes: list[Scene]) -> list[dict]:
    """GQA's open questions: the colour of each kind a scene holds once."""
    return [{"question": colour_question(obj.kind), "answer": obj.colour, "image": render_scene(scene)}
            for scene in scenes for obj in single_objects(scene)]  # fmt: skip


def choice_rows(scenes: list[Scene], seed: int) -> list[dict]:
    """ScienceQA-IMG's columns: "Which of these shapes is in the image?", a present kind and two absent ones in a
    seeded order, `answer` the present one's index (`target` its name, for the multiple-choice task)."""
    rng = random.Random(seed)
    rows = []
    for scene in scenes:
        present = sorted(scene.kinds)
        absent = [kind for kind in KINDS if kind not in scene.kinds]
        choices = [rng.choice(present), *rng.sample(absent, 2)]
        rng.shuffle(choices)
        answer = next(i for i, kind in enumerate(choices) if kind in scene.kinds)
        rows.append({"hint": "", "question": "Which of these shapes is in the image?", "choices": choices,
                     "answer": answer, "target": choices[answer], "image": render_scene(scene)})  # fmt: skip
    return rows


def textvqa_rows(scenes: list[Scene]) -> list[dict]:
    """TextVQA's columns: "How many <kind>s are there in the image?", its ten answers all the count."""
    rows = []
    for scene in scenes:
        image = render_scene(scene)
        for kind in sorted(scene.kinds):
            rows.append({"question_id": f"{scene.name}/{kind}", "question": count_question(kind),
                         "answers": [str(count_of(scene, kind))] * 10, "image": image})  # fmt: skip
    return rows


def write_tasks(folder: str | Path, num_images: int = 4, seed: int = DEFAULT_WORLD_SEED,
                formats: tuple[str, ...] = tuple(YAML)) -> Path:  # fmt: skip
    """Write each format's task (`folder/shapesworld_<format>/`: its YAML and `data/test.parquet`) about the first
    `num_images` suitable scenes of world `seed`; returns `folder`, lmms-eval's `--include_path`."""
    folder = Path(folder)
    pope, mme = pope_scenes(seed, num_images), mme_scenes(seed, num_images)
    rows = {"pope": lambda: pope_rows(pope), "mme": lambda: mme_rows(mme), "gqa": lambda: gqa_rows(mme),
            "scienceqa_img": lambda: choice_rows(pope, seed), "textvqa": lambda: textvqa_rows(pope),
            "choice": lambda: choice_rows(pope, seed)}  # fmt: skip
    for name in formats:
        task = folder / f"shapesworld_{name}"
        data = task / "data"
        data.mkdir(parents=True, exist_ok=True)
        table = rows[name]()
        features = datasets.Dataset.from_list(table).features
        features["image"] = datasets.Image()
        datasets.Dataset.from_list(table, features=features).to_parquet(data / f"{SPLIT}.parquet")
        header = f"task: shapesworld_{name}\ndataset_path: {data.resolve()}\ntest_split: {SPLIT}\n"
        (task / f"shapesworld_{name}.yaml").write_text(header + YAML[name])
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the tasks go (lmms-eval's --include_path)")
    parser.add_argument("--num-images", type=int, default=4, help="scenes per task (POPE: 6 questions each)")
    parser.add_argument("--seed", type=int, default=DEFAULT_WORLD_SEED, help="the ShapesWorld world")
    parser.add_argument("--formats", nargs="+", choices=list(YAML), default=list(YAML))
    args = parser.parse_args(argv)
    write_tasks(args.folder, args.num_images, args.seed, tuple(args.formats))
    print(f"wrote {', '.join(f'shapesworld_{name}' for name in args.formats)} to {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
