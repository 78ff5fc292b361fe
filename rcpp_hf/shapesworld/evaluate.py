"""ShapesWorld evaluation (`rcpp-hf eval shapesworld`): POPE splits, the MME-style set and partner-absent captions on held-out ShapesWorld scenes.

A run is a run directory (`rcpp_hf.eval.run_directory`, as every evaluation keeps one) with the split's data:

- `data/`: the split as files (POPE JSON lines, the MME-style folders or caption scenes, and the
  rendered images);
- `config.json`: what the run is (model, split, seed, sizes, prompt, the full generation config) and each session's
  provenance (versions, command); a rerun into the same folder must match it, so results of different settings never
  mix. `--limit` is not part of it: a run extended from 12 to 24 items keeps the 12 answers and asks the 12 new ones;
- `answers.part-0.jsonl`: one record per question or caption, appended as soon as its batch is generated;
  a rerun skips the ids already there, so an interrupted run loses nothing; `answers.jsonl`: the records of the
  selection in split order, written when the run completes;
- `metrics.json`: POPE metrics (accuracy, precision, recall, F1, yes-ratio), MME's scores (acc, acc+
  and score per subtask, as `rcpp_hf.eval.mme` computes them) or CHAIR metrics (CHAIR_S, CHAIR_I,
  recall, length, partner hallucination), over the records of the selection,
  and, with RCPP on, the mean share of visual tokens still in the KV cache at each item's last
  token (`visual_kept`; the schedule depends on the step alone, so batching does not change it);
  the visual tokens the prefill computed, averaged over the decoder's layers (`visual_tokens`: all
  of them without a prefill pruner, about the budget with one); and the time of the generate calls
  from a streamer's timestamps: `prefill_ms` per item (the batch's prompt forward, vision tower
  included, over its rows) and `decode_ms` per generated token of one answer (the batch's mean
  step over its rows). Times are taken on whatever else the machine runs: compare settings of one run.

Without --config the model decodes greedily with RCPP off (vanilla LLaVA); with
--config the YAML preset is loaded as an RCPPGenerationConfig; --method adds a registry method to
either (alone: RCPP off, greedy). Either way max_new_tokens is the split's (8 for POPE and MME answers,
64 for captions) unless --max-new-tokens says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoProcessor, GenerationConfig

from rcpp_hf.benchmark.measure import StepTimer
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.pruning import PruneRecord, visual_tokens_per_layer
from rcpp_hf.eval.harness import check_images_readable, read_image
from rcpp_hf.eval.mme import HALLUCINATION, mme_table_metrics, parse_mme_answer, read_mme
from rcpp_hf.eval.pope import parse_yes_no, pope_metrics
from rcpp_hf.eval.run_directory import RunDirectory, session_provenance
from rcpp_hf.methods import load_method
from rcpp_hf.modeling import RCPPLlavaForConditionalGeneration
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld.caption_sets import caption_rows, caption_scenes, write_caption_split
from rcpp_hf.shapesworld.chair import caption_metrics, caption_record
from rcpp_hf.shapesworld.conversations import CAPTION_PROMPT, chat_prompt, pope_prompt
from rcpp_hf.shapesworld.mme_sets import mme_scenes, write_mme_set
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS, pope_scenes, write_pope_split
from rcpp_hf.shapesworld.render import IMAGE_FOLDER, write_images
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED, Scene

SPLITS = (*POPE_SPLITS, "mme", "captions")
# The split's images are rendered into the run folder, a file already there kept: a damaged one is deleted by hand.
RENDERED_IMAGE_FIX = "delete each: the next run renders it again"


@dataclass(frozen=True)
class EvalSettings:
    """What a ShapesWorld evaluation run is; stored in config.json and checked on resume."""

    model: str
    split: str
    config: str | None = None  # RCPP YAML preset; None: vanilla greedy decoding
    method: dict | None = None  # a registry method (`MethodConfig.to_dict()`) added to the decoding
    seed: int = DEFAULT_WORLD_SEED
    num_images: int = 100
    limit: int | None = None  # evaluate only the first `limit` items of the split; not part of the identity
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: 8 for POPE and MME answers, 64 for captions

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {self.max_new_tokens}")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (64 if self.split == "captions" else 8)


def split_items(settings: EvalSettings, data_dir: Path) -> list[dict]:
    """Write the split's files under `data_dir`; return its items: id, image path, prompt and truth."""
    if settings.split == "captions":
        scenes = caption_scenes(settings.seed, settings.num_images)
        write_caption_split(scenes, data_dir)
        items = [{"id": row["id"], "image": row["image"], "prompt": CAPTION_PROMPT, "scene": row["scene"]}
                 for row in caption_rows(scenes)]  # fmt: skip
    elif settings.split == "mme":
        # Written in MME's layout and read back by MME's own loader; the images also go to images/.
        scenes = mme_scenes(settings.seed, settings.num_images)
        write_images(scenes, data_dir / IMAGE_FOLDER)
        questions = read_mme(write_mme_set(scenes, data_dir), HALLUCINATION)
        items = [{"id": q.id, "subtask": q.subtask, "image": q.image.name, "question": q.question,
                  "prompt": pope_prompt(q.question_without_instruction), "label": q.label}
                 for q in questions]  # fmt: skip
    else:
        path = write_pope_split(pope_scenes(settings.seed, settings.num_images), settings.split, data_dir)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        items = [{"id": f"{settings.split}/{row['question_id']}", "question_id": row["question_id"], "image": row["image"],
                  "question": row["text"], "prompt": pope_prompt(row["text"]), "label": row["label"]}
                 for row in rows]  # fmt: skip
    return items[: settings.limit]


def item_record(item: dict, answer: str, visual_kept: float | None, measured: dict | None = None) -> dict:
    """The results record of one generated answer: the item's fields, the answer, what was measured while
    generating it (`generate_answers`) and its scores."""
    record = dict(item, answer=answer, **(measured or {}))
    if visual_kept is not None:
        record["visual_kept"] = visual_kept
    if "scene" in record:
        scene = Scene.from_dict(record.pop("scene"))
        record.update(caption_record(answer, scene))
    elif "subtask" in record:
        record["prediction"] = parse_mme_answer(answer)
    else:
        record["prediction"] = parse_yes_no(answer)
    return record


def split_metrics(split: str, records: list[dict]) -> dict:
    if split == "captions":
        metrics = caption_metrics(records)
    elif split == "mme":
        metrics = mme_table_metrics(records)  # with flat copies for tables
    else:
        metrics = pope_metrics([r["label"] for r in records], [r["prediction"] for r in records])
    for field, metric, scale in (("visual_kept", "visual_kept", 1), ("visual_tokens", "visual_tokens", 1),
                                 ("prefill_s", "prefill_ms", 1e3), ("decode_s", "decode_ms", 1e3),
                                 ("num_heads", "num_heads", 1)):  # fmt: skip
        values = [r[field] for r in records if r.get(field) is not None]
        if values:
            metrics[metric] = scale * sum(values) / len(values)
    return metrics


def prefill_visual_tokens(records: list[PruneRecord], num_layers: int, num_visual: int) -> float:
    """Visual tokens the prefill computed, averaged over the decoder's layers: `num_visual` up to the first pruning
    stage, then each stage's `kept` from its layer on (the "equivalent" budget of FinePruner's `R_dict`)."""
    per_layer = visual_tokens_per_layer({record.layer: record.kept for record in records}, num_layers, num_visual)
    return sum(per_layer) / num_layers


def generation_config_for(settings: EvalSettings, tokenizer) -> RCPPGenerationConfig:
    """The run's generation config: the YAML preset (RCPP) or plain greedy, the method added, with the split's token
    budget and the tokenizer's pad and eos tokens."""
    method = None if settings.method is None else load_method(settings.method)
    return build_generation_config(settings.config, method, max_new_tokens=settings.new_tokens,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   return_dict_in_generate=True)  # fmt: skip


def generate_answers(
    model, processor, images: list[Image.Image], prompts: list[str], generation_config: GenerationConfig
) -> tuple[list[str], list[float | None], dict]:
    """One answer per (image, prompt), batched with left padding; with RCPP on, the share of visual tokens still
    cached at each row's last generated token (None without RCPP); and what the batch measured, per row:
    `visual_tokens` (`prefill_visual_tokens`), `prefill_s` and `decode_s` (see the module docstring)."""
    texts = [chat_prompt(processor, p) for p in prompts]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True).to(model.device)
    timer = StepTimer()
    with torch.inference_mode():
        timer.start()
        out = model.generate(**inputs, generation_config=generation_config, streamer=timer)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    num_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    decode = timer.decode_seconds
    measured = {
        "visual_tokens": prefill_visual_tokens(getattr(out, "pruning", None) or [],
                                               model.config.text_config.num_hidden_layers, num_visual),
        "prefill_s": timer.prefill_seconds / len(answers),
        "decode_s": sum(decode) / len(decode) / len(answers) if decode else None,
    }  # fmt: skip
    heads = [h for record in getattr(out, "pruning", None) or [] for h in record.details.get("num_heads", [])]
    if heads:  # FastV + FinePruner: attention heads chosen, averaged over the batch's rows and stages
        measured["num_heads"] = sum(heads) / len(heads)
    trace = getattr(out, "rcpp", None)
    if trace is None:
        return answers, [None] * len(answers), measured
    # A row's length: its tokens up to and including its first eos (the rest is padding after it finished).
    is_eos = new_tokens == generation_config.eos_token_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, new_tokens.shape[1])
    kept = [1.0 - trace.steps[int(n) - 1].scores[row].isnan().float().mean().item() for row, n in enumerate(lengths)]
    return answers, kept, measured


def evaluate(settings: EvalSettings, output_dir: str | Path, progress: bool = True) -> dict:
    """Run (or resume) one evaluation; returns the metrics, also written to `output_dir/metrics.json`."""
    run_dir = RunDirectory(output_dir)
    processor = AutoProcessor.from_pretrained(settings.model)
    generation_config = generation_config_for(settings, processor.tokenizer)
    # The limit chooses how many items are asked, not how: it stays out of the run's identity.
    identity = {key: value for key, value in asdict(settings).items() if key != "limit"}
    if settings.method is None:  # runs recorded before methods existed stay resumable
        del identity["method"]
    run = {"settings": identity, "prompt": _prompt_of(settings.split), "generation_config": generation_config.to_dict()}
    run_dir.check_identity(run)
    run_dir.record_session(run, session_provenance(limit=settings.limit))
    data_dir = run_dir.path / "data"
    items = split_items(settings, data_dir)
    done = run_dir.done_ids()
    todo = [item for item in items if item["id"] not in done]
    image_files = {item["id"]: data_dir / IMAGE_FOLDER / item["image"] for item in todo}
    check_images_readable(image_files.values(), RENDERED_IMAGE_FIX)  # before the model loads

    if todo:
        model = RCPPLlavaForConditionalGeneration.from_pretrained(settings.model).eval()
        part = run_dir.part(0)
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"shapesworld {settings.split}", disable=not progress)
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            images = [read_image(image_files[item["id"]], RENDERED_IMAGE_FIX).convert("RGB") for item in batch]
            answers, kept, measured = generate_answers(model, processor, images, [item["prompt"] for item in batch],
                                                       generation_config)  # fmt: skip
            part.extend(item_record(item, answer, k, measured) for item, answer, k in zip(batch, answers, kept))
            bar.update(len(batch))
        bar.close()

    records = run_dir.answers_in_order([item["id"] for item in items])
    run_dir.write_answers(records)
    metrics = {"split": settings.split, **split_metrics(settings.split, records), "limit": settings.limit, "run": run}
    run_dir.write_metrics(metrics)
    return metrics


def _prompt_of(split: str) -> str:
    return CAPTION_PROMPT if split == "captions" else pope_prompt("{question}")
