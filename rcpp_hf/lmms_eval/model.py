"""`RCPPLmms`: any checkpoint rcpp_hf loads, with any registry method, as an lmms-eval model named `rcpp_hf`.

    lmms-eval --model rcpp_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64,batch_size=16 \\
        --tasks pope,mme,gqa

`--model_args` (lmms-eval parses `key=value,...`, numbers and true / false included):
  - `pretrained`: a checkpoint folder, a hub id or `shapesworld-smol` (default: the embedded ShapesWorld model); the
    model family comes from the checkpoint (`rcpp_hf.from_pretrained`). `dtype` (auto, float32, float16, bfloat16),
    `device` (default: this process's device) or `device_map` (e.g. auto), `image_aspect` (pad: padded to a square,
    LLaVA-1.5's own evaluation and its default; crop: the image as it is to the processor, the llava-hf LLaVA-1.5
    processor's centre crop, and the default of the anyres families, whose official evaluation tiles the image
    as it is, and of Qwen-VL, which resizes it as it is).
  - `method`: a registry method or method preset (`rcpp` included), its settings as further `key=value`s, `budget`
    in the library's convention (an integer count or a fraction of the image's visual tokens); `config`: a
    generation preset (e.g. `rcpp_evict`). Neither: plain greedy decoding, exactly the stock transformers model.
  - `batch_size` (also lmms-eval's `--batch_size`; model_args win), `max_new_tokens` (replaces the tasks' own),
    `statistics`: a JSON file for the per-task method statistics.
Every value is checked before any weights load; a bad one raises `ModelArgsError`, one line naming it.

Prompts are the checkpoint's chat template, the request's images first ("USER: <image>\\n{context} ASSISTANT:" for
LLaVA-1.5), unless the task's context places `<image>` itself. `generate_until` batches requests of equal generation
settings, longest prompt first, with left padding; the answer is cut at the first of the task's `until` strings.

Statistics, per generated request and averaged per task (`statistics` below, the `throughput` section of
lmms-eval's results as `avg_<task>/<name>`, and the `statistics` JSON file): the visual tokens each decoder layer
computed in the prefill (`visual_tokens_per_layer`, their mean `visual_tokens`, and `visual_tokens_input`, the
image's), the prefill time (`prefill_ms`: the batch's prompt forward, vision tower included, over its rows), the KV
cache at the end (`kv_bytes`, `visual_kv_bytes`: the batch's over its rows), and `new_tokens`. Several processes
(`accelerate launch -m lmms_eval ...`) each answer their shard of the documents; the statistics are gathered.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from tqdm.auto import tqdm

from rcpp_hf.benchmark.measure import StepTimer
from rcpp_hf.cli.errors import UsageError
from rcpp_hf.cli.options import check_device, model_folder
from rcpp_hf.engine.cache import VisualKVCache, cache_nbytes
from rcpp_hf.engine.pruning import visual_tokens_per_layer
from rcpp_hf.eval.answerer import (
    DTYPES,
    IMAGE_ASPECTS,
    answer_length,
    eos_ids,
    expand_to_square,
    load_model,
    pad_colour,
    with_checkpoint_token_ids,
)
from rcpp_hf.eval.harness import process_state
from rcpp_hf.methods import load_method
from rcpp_hf.modeling import methods_active
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld.conversations import chat_prompt

DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's LLaVA models' default, for a task that sets none
# The generation settings of a task that are honoured; the others (model-specific ones such as
# `image_aspect_ratio`) are ignored, and said so once.
GENERATION_KWARGS = ("max_new_tokens", "until", "temperature", "do_sample", "top_p", "num_beams")
# The model types whose official evaluation pads images to a square (LLaVA-1.5's `expand2square`); the anyres
# families' (LLaVA-NeXT, OneVision) tile the image as it is, Qwen-VL's resizes it as it is.
PADDED_FAMILIES = ("llava",)
# The statistics averaged per task (besides the per-layer list).
STATISTICS = ("visual_tokens", "visual_tokens_input", "prefill_ms", "kv_bytes", "visual_kv_bytes", "new_tokens")


class ModelArgsError(ValueError):
    """A `--model_args` value rcpp_hf cannot use: one line naming it and what to pass instead."""


def model_arg_problem(name: str, value, error: Exception) -> ModelArgsError:
    """`error` (a command-line check's UsageError, "--flag value: why; fix", or a ValueError) as a ModelArgsError
    naming the model arg."""
    reason = str(error)
    if reason.startswith("--"):
        reason = reason.split(": ", 1)[-1]
    return ModelArgsError(f"rcpp_hf model_args {name}={value}: {reason}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ModelArgsError(f"rcpp_hf model_args {name}={value}: must be an integer >= 1")
    return int(value)


class RCPPLmms(lmms):
    """rcpp_hf's model in lmms-eval (registered as `rcpp_hf`; see the module docstring for its model_args)."""

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        device_map: str | None = None,
        method: str | None = None,
        config: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | None = None,
        image_aspect: str | None = None,
        statistics: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval passes it with --batch_size auto, which is refused
        **method_settings,
    ) -> None:
        super().__init__()
        self.batch_size_per_gpu = positive_int("batch_size", batch_size)
        self.max_new_tokens = None if max_new_tokens is None else positive_int("max_new_tokens", max_new_tokens)
        if image_aspect is not None and image_aspect not in IMAGE_ASPECTS:
            raise ModelArgsError(f"rcpp_hf model_args image_aspect={image_aspect}: must be one of {IMAGE_ASPECTS}")
        if dtype not in DTYPES:
            raise ModelArgsError(f"rcpp_hf model_args dtype={dtype}: must be one of {list(DTYPES)}")
        try:
            path = model_folder(pretrained)
        except UsageError as error:
            raise model_arg_problem("pretrained", pretrained, error) from None
        try:
            check_device(device)
        except UsageError as error:
            raise model_arg_problem("device", device, error) from None
        self.generation_config = with_checkpoint_token_ids(generation_config(method, config, method_settings), path)
        self.statistics_file = None if statistics is None else Path(statistics)

        # lmms-eval's command line builds its Accelerator before the model: CPU processes join only when the
        # environment says CPU (accelerate's --cpu launch flag alone starts one process).
        state, device = process_state(device, "For CPU processes, set ACCELERATE_USE_CPU=1 in accelerate "
                                              "launch's environment.")
        self._rank, self._world_size = state.process_index, state.num_processes
        self.model, self.processor = load_model(path, dtype, device, device_map)
        self.pretrained = path
        self.image_aspect = image_aspect or ("pad" if self.model.config.model_type in PADDED_FAMILIES else "crop")
        self._pad_colour = pad_colour(self.processor)
        self._eos_ids = eos_ids(self.generation_config)
        self._ignored_kwargs: set[str] = set()
        self.statistics: dict[str, dict] = {}  # task -> the averages of its last evaluation (see `summarize`)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> RCPPLmms:
        """lmms-eval's constructor from `--model_args`; its command line always adds `batch_size` (default 1): a
        value given in model_args wins over it instead of colliding with it."""
        values = lmms_utils.simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is not None and key not in values:
                values[key] = value
        return cls(**values)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- prompts ----------------------------------------------------------------------------------------------------
    def _visuals(self, args: tuple) -> list:
        """The request's images (RGB; padded to a square with the processor's mean colour for image_aspect=pad)."""
        _, _, doc_to_visual, doc_id, task, split = args
        images = [image.convert("RGB") for image in doc_to_visual(self.task_dict[task][split][doc_id]) or []]
        if self.image_aspect == "pad":
            images = [expand_to_square(image, self._pad_colour) for image in images]
        return images

    def _prompt(self, context: str, num_images: int) -> str:
        """The chat template's single-turn prompt: the images first, unless the context places them itself."""
        return chat_prompt(self.processor, context, 0 if self.processor.image_token in context else num_images)

    def _inputs(self, prompts: list[str], images: list) -> dict:
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        return inputs.to(self.model.device, dtype=self.model.dtype)

    # -- generate_until -----------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        def longest_first(args):
            return -len(self.processor.tokenizer(args[0])["input_ids"])

        batches = lmms_utils.Collator([request.args for request in requests], longest_first, grouping=True)
        padding = {index for index, request in enumerate(requests) if request.metadata.get("__padding_only__")}
        answers, records = [], []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="rcpp_hf generating")
        for batch in batches.get_batched(n=self.batch_size):
            texts, batch_records = self._generate_batch(batch)
            answers.extend(texts)
            records.extend(batch_records)
            bar.update(len(batch))
        bar.close()
        # The collator's order of the requests, to leave out the copies lmms-eval pads a process's share with.
        order = batches.reorder_indices
        self._collect([record for index, record in zip(order, records) if index not in padding])
        return batches.get_original(answers)

    @torch.inference_mode()
    def _generate_batch(self, batch: list[tuple]) -> tuple[list[str], list[dict]]:
        """Answers of one batch (requests of equal generation settings) and each request's statistics."""
        gen_kwargs = batch[0][1]
        images = [self._visuals(args) for args in batch]
        prompts = [self._prompt(args[0], len(row)) for args, row in zip(batch, images)]
        inputs = self._inputs(prompts, [image for row in images for image in row])
        timer = StepTimer()
        timer.start()
        out = self.model.generate(**inputs, generation_config=self._config_for(gen_kwargs), streamer=timer)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else until
        texts, records = [], []
        rows = len(batch)
        num_layers = self.model.config.get_text_config().num_hidden_layers
        cache = out.past_key_values
        # Each row's own image tokens (anyres images of different sizes differ) and each stage's count for that row.
        num_visual_per_row = self.model.family.image_token_mask(inputs["input_ids"]).sum(dim=1).tolist()
        stages = getattr(out, "pruning", None) or []
        for row, (args, tokens) in enumerate(zip(batch, new_tokens)):
            length = answer_length(tokens, self._eos_ids)
            text = self.processor.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop, 1)[0]
            texts.append(text.strip())
            num_visual = num_visual_per_row[row]
            kept = {r.layer: r.kept if r.kept_per_row is None else r.kept_per_row[row] for r in stages}
            per_layer = visual_tokens_per_layer(kept, num_layers, num_visual)
            records.append({
                "task": args[4], "doc_id": args[3],
                "visual_tokens_per_layer": per_layer,
                "visual_tokens": sum(per_layer) / num_layers,
                "visual_tokens_input": num_visual,
                "prefill_ms": 1e3 * timer.prefill_seconds / rows,
                "kv_bytes": cache_nbytes(cache) / rows,
                "visual_kv_bytes": cache.visual_nbytes() / rows if isinstance(cache, VisualKVCache) else None,
                "new_tokens": length,
                "seconds": timer.total_seconds / rows,
            })  # fmt: skip
        return texts, records

    def _config_for(self, gen_kwargs: dict):
        """The run's generation config with a task's settings: its token budget (unless max_new_tokens is a model
        arg), greedy (temperature 0, lmms-eval's default) or sampling."""
        ignored = set(gen_kwargs) - set(GENERATION_KWARGS) - self._ignored_kwargs
        if ignored:
            logger.warning(f"rcpp_hf ignores the generation settings {sorted(ignored)} of a task")
            self._ignored_kwargs |= ignored
        if gen_kwargs.get("num_beams", 1) not in (1, None):
            raise ValueError(f"rcpp_hf decodes greedily or by sampling; a task asks for num_beams="
                             f"{gen_kwargs['num_beams']}")
        config = copy.deepcopy(self.generation_config)
        config.max_new_tokens = self.max_new_tokens or gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        temperature = gen_kwargs.get("temperature")
        # lmms-eval's convention: a temperature above 0 samples; do_sample alone samples at temperature 1.
        config.do_sample = (temperature or 0) > 0 or (temperature is None and bool(gen_kwargs.get("do_sample")))
        if config.do_sample:
            config.temperature = temperature or 1.0
            config.top_p = gen_kwargs.get("top_p") or 1.0
        return config

    # -- statistics -------------------------------------------------------------------------------------------------
    def _collect(self, records: list[dict]) -> None:
        """Average this call's records per task (over every process's), keep them in `statistics`, and report them
        (process 0): lmms-eval's throughput section and the `statistics` file."""
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        by_task = defaultdict(list)
        for record in records:
            by_task[record["task"]].append(record)
        self.statistics = {task: summarize(rows) for task, rows in by_task.items()}
        if self.rank != 0:
            return
        for task, summary in self.statistics.items():
            rows = by_task[task]
            seconds = sum(row["seconds"] for row in rows)
            tokens = sum(row["new_tokens"] for row in rows)
            averages = {f"{task}/{name}": summary[name] for name in STATISTICS if summary[name] is not None}
            log_metrics(seconds, tokens, tokens / seconds, {"total_requests": len(rows), **averages})
        if self.statistics_file is not None:
            self.statistics_file.parent.mkdir(parents=True, exist_ok=True)
            report = {"model": str(self.pretrained), "generation_config": self.generation_config.to_diff_dict(),
                      "tasks": self.statistics}  # fmt: skip
            self.statistics_file.write_text(json.dumps(report, indent=2, default=str) + "\n")

    # -- loglikelihood ------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """The negative log-likelihood of each continuation given its context (multiple-choice tasks take the
        smallest) and whether greedy decoding would produce it. Without a method: the model's forward over context
        and continuation. With one: the logits its `generate` gives the first new token (prefill pruning and
        contrastive decoding included), so continuations must be one token (multiple-choice letters)."""
        results = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="rcpp_hf scoring")
        for start in range(0, len(requests), self.batch_size):
            batch = [request.args for request in requests[start : start + self.batch_size]]
            results.extend(self._score_batch(batch))
            bar.update(len(batch))
        bar.close()
        # lmms-eval 0.7.3 stringifies a bare (float, bool); wrapped, the pair reaches the task as it is.
        return [GenerationResult(text=result) for result in results]

    @torch.inference_mode()
    def _score_batch(self, batch: list[tuple]) -> list[tuple[float, bool]]:
        images = [self._visuals(args) for args in batch]
        prompts = [self._prompt(args[0], len(row)) for args, row in zip(batch, images)]
        tokenizer = self.processor.tokenizer
        continuations = []
        for prompt, args in zip(prompts, batch):
            whole = tokenizer(prompt + args[1])["input_ids"]
            context = tokenizer(prompt)["input_ids"]
            if whole[: len(context)] != context:
                raise ValueError(f"the continuation {args[1]!r} changes how the prompt tokenizes; rcpp_hf scores "
                                 "continuations that start a new token (e.g. ' A')")  # fmt: skip
            continuations.append(whole[len(context) :])
        flat_images = [image for row in images for image in row]
        if methods_active(self.generation_config):
            if any(len(tokens) != 1 for tokens in continuations):
                raise ValueError("with a method on, rcpp_hf scores one-token continuations (multiple-choice letters); "
                                 "a task asks for longer ones: run it without method=")  # fmt: skip
            config = copy.deepcopy(self.generation_config)
            config.max_new_tokens, config.do_sample, config.output_logits = 1, False, True
            out = self.model.generate(**self._inputs(prompts, flat_images), generation_config=config)
            logits = [out.logits[0][row : row + 1] for row in range(len(batch))]  # (1, vocab) each
        else:
            inputs = self._inputs([p + args[1] for p, args in zip(prompts, batch)], flat_images)
            full = self.model(**inputs).logits  # left padding: each continuation ends the row
            logits = [full[row, -len(tokens) - 1 : -1] for row, tokens in enumerate(continuations)]
        results = []
        for row_logits, tokens in zip(logits, continuations):
            target = torch.tensor(tokens, device=row_logits.device)
            log_probs = row_logits.float().log_softmax(-1)
            nll = -log_probs.gather(-1, target[:, None]).sum().item()
            results.append((nll, bool((row_logits.argmax(-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("rcpp_hf answers single-turn requests (generate_until, loglikelihood); a "
                                  "multi-round task is not supported")  # fmt: skip

    def clean(self) -> None:
        """lmms-eval calls this after each evaluation; its default deletes the model. Kept, one instance serves
        several evaluations (`simple_evaluate(model=instance, ...)` again)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def generation_config(method: str | None, config: str | None, settings: dict):
    """The run's generation config from `method=` (with its `settings`) and `config=`, validated (ModelArgsError)."""
    if settings and method is None:
        given = ", ".join(f"{key}={value}" for key, value in settings.items())
        raise ModelArgsError(f"rcpp_hf model_args {given}: not a model arg, and no method= to take it as a method "
                             "setting; model args: pretrained, dtype, device, device_map, method, config, batch_size, "
                             "max_new_tokens, image_aspect, statistics")  # fmt: skip
    try:
        registered = None if method is None else load_method(method, **settings)
        return build_generation_config(config, registered, return_dict_in_generate=True)
    except (ValueError, OSError) as error:
        name, value = ("method", method) if config is None else ("config", config)
        raise model_arg_problem(name, value, error) from None


def summarize(records: list[dict]) -> dict:
    """The mean of each statistic over `records` (None where none has it) and the mean visual tokens per layer."""
    summary = {"requests": len(records)}
    for name in STATISTICS:
        values = [record[name] for record in records if record[name] is not None]
        summary[name] = sum(values) / len(values) if values else None
    layers = [record["visual_tokens_per_layer"] for record in records]
    summary["visual_tokens_per_layer"] = [sum(column) / len(column) for column in zip(*layers)]
    return summary
