"""Running a benchmark: questions in, answers appended as they come, metrics out; resumable and shardable.

Every benchmark turns its inputs into `EvalItem`s and calls `run_quality_eval`. The pending items
(those no earlier session answered) are cut into batches in benchmark order and batch `b` goes to
process `b % num_processes`, so under `accelerate launch` every batch is the very batch a single
process would have run, and the merged answers equal a single-process run's.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from rcpp_hf.default_model import default_model_path
from rcpp_hf.eval.answerer import (
    DTYPES,
    IMAGE_ASPECTS,
    LLAVA_SYSTEM_PROMPT,
    Answerer,
    load_model,
    with_checkpoint_token_ids,
)
from rcpp_hf.eval.run_directory import RunDirectory, session_provenance
from rcpp_hf.run_config import build_generation_config, load_method_preset


@dataclass
class RunOptions:
    """How to run a benchmark, shared by all benchmarks (their own inputs are separate arguments)."""

    output_dir: str | Path
    model: str | Path | None = None  # a folder or hub id; None: rcpp_hf.default_model.default_model_path()
    config: str | Path | None = None  # RCPPGenerationConfig YAML preset; None: plain greedy LLaVA decoding
    method: str | None = None  # a registry method added to the decoding (alone, greedy, when `config` is None)
    method_config: str | Path | None = None  # its YAML preset or settings (`rcpp_hf.run_config`)
    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the benchmark's default
    seed: int = 0
    dtype: str = "auto"
    device: str | None = None  # None: the device accelerate gives this process
    system_prompt: str = LLAVA_SYSTEM_PROMPT
    image_aspect: str = "pad"
    limit: int | None = None  # only the first `limit` items (smoke tests); not part of the run's identity

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {self.image_aspect!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class EvalItem:
    """One question to the model: a unique id, the user message, its image, what to store with the answer.

    `image` is a file (checked to exist and to open as an image before any model work, read when its batch runs) or
    a function returning the image (images held in memory or inside a dataset file).
    """

    id: str
    prompt: str
    image: Path | Callable[[], Image.Image]
    fields: dict = field(default_factory=dict)  # stored with the answer, e.g. the label

    def load_image(self) -> Image.Image:
        if not callable(self.image):
            return read_image(self.image)
        try:
            return self.image()
        except UnidentifiedImageError:
            raise ValueError(f"item {self.id}: its image (held in the benchmark's data file) is not an image PIL can "
                             "read; the data file is damaged: fetch it again") from None  # fmt: skip


IMAGE_FIX = "replace each with the benchmark's image (PNG, JPEG, ...), or pass the folder that holds its images"


def unreadable_image(path: str | Path) -> str | None:
    """Why PIL cannot read the image file `path`, in a few words; None when it can (`Image.open` and `verify`: the
    header and, for PNG, the chunks' checksums; no decoding)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return "not an image"
    except FileNotFoundError:
        return "not found"
    except (OSError, SyntaxError, ValueError) as error:  # a damaged image: PIL raises any of these
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def check_images_readable(paths: Iterable[Path], fix: str = IMAGE_FIX) -> None:
    """Raise ValueError naming the image files PIL cannot read (at most five) and `fix`, what to do about them."""
    bad = [(str(path), why) for path in dict.fromkeys(paths) if (why := unreadable_image(path)) is not None]
    if bad:
        shown = ", ".join(f"{path} ({why})" for path, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{f'{len(bad)} image files' if len(bad) > 1 else 'image file'} PIL cannot read: {shown}{more}; "
                         f"{fix}")


def read_image(path: str | Path, fix: str = IMAGE_FIX) -> Image.Image:
    """The image file `path`, decoded; a file that is not one (or is damaged past what `verify` sees) is a ValueError
    naming it and `fix`."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:
        why = "not an image" if isinstance(error, UnidentifiedImageError) else str(error).strip().splitlines()[0]
        raise ValueError(f"image file PIL cannot read: {path} ({why}); {fix}") from error


def check_files_exist(paths: Iterable[Path], what: str) -> None:
    """Raise FileNotFoundError naming the missing files (at most five)."""
    missing = list(dict.fromkeys(str(path) for path in paths if not Path(path).is_file()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} {what} not found: {shown}")


def check_prompt_template(template: str, fields: tuple[str, ...]) -> None:
    """Refuse a prompt template that does not use exactly `fields` (e.g. ("question",)) as str.format fields."""
    try:
        template.format(**{name: "" for name in fields})
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"prompt template {template!r} can only use the fields {list(fields)} ({error!r})") from None
    missing = [name for name in fields if "{" + name + "}" not in template]
    if missing:
        raise ValueError(f"prompt template {template!r} must contain {', '.join('{' + m + '}' for m in missing)}")


def run_quality_eval(
    benchmark: str,
    items: list[EvalItem],
    options: RunOptions,
    *,
    inputs: dict,
    user_prompt: str,
    default_max_new_tokens: int,
    score: Callable[[dict], dict],
    summarize: Callable[[list[dict]], dict],
) -> dict:
    """Answer every item not yet answered in `options.output_dir`, then score and summarise all answers.

    `inputs` (JSON) names the benchmark's data and is part of the run's identity; `user_prompt` is the
    benchmark's prompt template, recorded. `score(record)` returns the fields a record gains in
    answers.jsonl (e.g. the parsed prediction); `summarize(scored records in item order)` returns the
    metrics, with a "headline" dict of the numbers `rcpp-hf report` tabulates.
    Returns the metrics, as written to metrics.json.
    """
    # The limit chooses how many items are asked, not how they are asked: it stays out of the identity, so a
    # run extended from 12 to 24 items keeps the 12 answers and asks only the 12 new items.
    if options.limit is not None:
        items = items[: options.limit]
    _check_unique_ids(items)
    check_files_exist((item.image for item in items if not callable(item.image)), "image files")
    model_path = str(options.model if options.model is not None else default_model_path())
    max_new_tokens = options.max_new_tokens or default_max_new_tokens
    method = load_method_preset(options.method, options.method_config)
    generation_config = build_generation_config(options.config, method, max_new_tokens=max_new_tokens)
    generation_config = with_checkpoint_token_ids(generation_config, model_path)
    identity = {
        "benchmark": benchmark,
        "inputs": inputs,
        "model": model_path,
        "dtype": options.dtype,
        "decoding_config_file": str(options.config) if options.config is not None else None,
        "generation_config": _recorded_generation_config(generation_config),
        "prompt": {"system": options.system_prompt, "user": user_prompt},
        "image_aspect": options.image_aspect,
        "seed": options.seed,
    }
    if method is not None:  # only then, so that runs recorded before methods existed stay resumable
        identity["method"] = method.to_dict()
    state, device = process_state(options.device)
    run_dir = RunDirectory(options.output_dir)
    run_dir.check_identity(identity)
    done = run_dir.done_ids()
    pending = [item for item in items if item.id not in done]
    check_images_readable(item.image for item in pending if not callable(item.image))  # those this run will read
    state.wait_for_everyone()  # every process has read what is done before anyone writes
    if state.is_main_process:
        run_dir.record_session(
            identity,
            session_provenance(
                num_processes=state.num_processes, batch_size=options.batch_size, device=str(device), limit=options.limit
            ),
        )

    batches = [pending[start : start + options.batch_size] for start in range(0, len(pending), options.batch_size)]
    own_batches = batches[state.process_index :: state.num_processes]
    if own_batches:
        model, processor = load_model(model_path, options.dtype, device)
        answerer = Answerer(model, processor, generation_config, options.system_prompt, options.image_aspect)
        _answer(answerer, own_batches, run_dir.part(state.process_index), options.seed, benchmark, state)
    state.wait_for_everyone()

    if state.is_main_process:
        records = [{**record, **score(record)} for record in run_dir.answers_in_order([item.id for item in items])]
        run_dir.write_answers(records)
        metrics = {"benchmark": benchmark, "n": len(records), **summarize(records), "latency": _latency(records)}
        run_dir.write_metrics(metrics)
        headline = ", ".join(f"{name} {value:.4g}" for name, value in metrics["headline"].items())
        print(f"{benchmark}: {headline} ({len(records)} items) -> {run_dir.metrics_path}")
    state.wait_for_everyone()
    return run_dir.read_metrics()


def _answer(answerer: Answerer, batches: list[list[EvalItem]], part, seed: int, benchmark: str, state) -> None:
    progress = tqdm(
        total=sum(len(batch) for batch in batches),
        desc=f"{benchmark} (process {state.process_index + 1}/{state.num_processes})",
        disable=not state.is_local_main_process,
    )
    for batch in batches:
        # Seeded by the batch's first id: sampled answers do not depend on sharding or on resuming.
        torch.manual_seed(zlib.crc32(f"{seed}/{batch[0].id}".encode()))
        images = [item.load_image() for item in batch]
        start = time.perf_counter()
        answers = answerer(images, [item.prompt for item in batch])
        seconds = (time.perf_counter() - start) / len(batch)
        part.extend(
            {"id": item.id, **item.fields, "answer": answer.text, "num_tokens": answer.num_tokens, "seconds": seconds}
            for item, answer in zip(batch, answers)
        )
        progress.update(len(batch))
    progress.close()


def _latency(records: list[dict]) -> dict:
    """Mean answering wall time (processor + generate) and generated tokens per item; a batch shares its time."""
    n = max(len(records), 1)
    return {
        "seconds_per_item": sum(record["seconds"] for record in records) / n,
        "tokens_per_item": sum(record["num_tokens"] for record in records) / n,
    }


def _check_unique_ids(items: list[EvalItem]) -> None:
    seen = set()
    for item in items:
        if item.id in seen:
            raise ValueError(f"item id {item.id!r} appears twice; ids must be unique within a run")
        seen.add(item.id)


def _recorded_generation_config(config) -> dict:
    recorded = config.to_diff_dict()
    for volatile in ("transformers_version", "_from_model_config"):
        recorded.pop(volatile, None)
    return recorded


def process_state(device: str | None, cpu_fix: str = "Pass --device cpu for a CPU run."):
    """accelerate's process state and this process's device; CPU processes join through gloo. A launch whose
    processes did not join is refused, `cpu_fix` saying how CPU processes join."""
    from accelerate import PartialState

    use_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=use_cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but accelerate joined {state.num_processes}; "
            f"every process would answer every question. {cpu_fix}"
        )
    return state, torch.device(device) if device is not None else state.device
