"""rcpp_hf as an lmms-eval model: ShapesWorld tasks in the formats of lmms-eval's pope, mme, gqa, scienceqa_img and
textvqa tasks (scored by their own functions), run through `simple_evaluate` and the `lmms-eval` command line, on
the embedded model; answers equal `generate` called directly on the same chat-template prompts."""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import ImageFile
from transformers import AutoProcessor, LlavaForConditionalGeneration

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e \".[lmms]\", or the lean install "
                    "of the README)")  # fmt: skip

from rcpp_hf import RCPPGenerationConfig  # noqa: E402
from rcpp_hf.default_model import default_model_path  # noqa: E402
from rcpp_hf.engine.pruning import visual_tokens_per_layer  # noqa: E402
from rcpp_hf.lmms_eval.model import ModelArgsError, RCPPLmms  # noqa: E402
from rcpp_hf.lmms_eval.shapesworld_tasks import write_tasks  # noqa: E402
from rcpp_hf.methods import load_method  # noqa: E402
from rcpp_hf.shapesworld.conversations import chat_prompt  # noqa: E402
from tests.conftest import QWEN_RAGGED_SIZES, RAGGED_SIZES  # noqa: E402

GENERATED = ["shapesworld_pope", "shapesworld_mme", "shapesworld_gqa", "shapesworld_scienceqa_img",
             "shapesworld_textvqa"]  # fmt: skip
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_pil_restored():
    """The embedded model is small: one thread answers faster than two on a shared 2-core machine. lmms-eval's task
    module sets PIL's global LOAD_TRUNCATED_IMAGES on import (which is why it is imported here, not at collection):
    restored afterwards, so that the other tests still see damaged images refused."""
    threads, truncated = torch.get_num_threads(), ImageFile.LOAD_TRUNCATED_IMAGES
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from lmms_eval.tasks import TaskManager

    folder = write_tasks(tmp_path_factory.mktemp("lmms-tasks"), num_images=2)
    return folder, TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def lm():
    """One instance for every evaluation of the module: `clean()` keeps its model between them."""
    return RCPPLmms(batch_size=3)


@pytest.fixture(scope="module")
def stock():
    """The stock transformers class and the processor of the embedded checkpoint, for the direct `generate` calls."""
    path = default_model_path()
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def evaluate(lm, tasks, names, **kwargs):
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(model=lm, tasks=names, task_manager=tasks[1], log_samples=True, verbosity="ERROR", **kwargs)


def image_of(lm, task, sample):
    """A logged sample's image (lmms-eval logs its document without the image): from the model's view of the data."""
    return lm.task_dict[task]["test"][sample["doc_id"]]["image"].convert("RGB")


def direct_answer(model, processor, sample, image, generation_config=None) -> str:
    """`generate` on the sample's prompt in the checkpoint's chat template, its image first, batch 1, greedy (the
    stock class with its own generation config, or rcpp_hf's with `generation_config`)."""
    context, gen_kwargs = sample["arguments"][:2]  # lmms-eval logs a request's arguments without doc_to_visual
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        if generation_config is None:
            sequences = model.generate(**inputs, max_new_tokens=gen_kwargs["max_new_tokens"], do_sample=False)
        else:
            generation_config.max_new_tokens = gen_kwargs["max_new_tokens"]
            sequences = model.generate(**inputs, generation_config=generation_config)
    return processor.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def answers(results) -> dict:
    return {task: [sample["resps"][0][0] for sample in samples] for task, samples in results["samples"].items()}


def test_five_task_formats_answer_what_generate_answers(lm, tasks, stock):
    results = evaluate(lm, tasks, GENERATED)
    model, processor = stock
    for task in GENERATED:
        samples = results["samples"][task]
        assert len(samples) >= 2
        direct = [direct_answer(model, processor, sample, image_of(lm, task, sample)) for sample in samples]
        assert [sample["resps"][0][0] for sample in samples] == direct
    # The tasks' own metric functions scored them: POPE's accuracy is the share of answers equal to the label.
    pope = results["samples"]["shapesworld_pope"]
    correct = [s["resps"][0][0].lower() == s["doc"]["answer"] for s in pope]
    assert results["results"]["shapesworld_pope"]["pope_accuracy,none"] == pytest.approx(sum(correct) / len(pope))
    assert sum(correct) > len(pope) / 2  # the trained model answers its own kind of question
    assert 0 <= results["results"]["shapesworld_mme"]["mme_perception_score,none"] <= 4 * 200


def test_a_methods_answers_and_statistics(tasks, stock, tmp_path):
    fastv = RCPPLmms(method="fastv", budget=0.33, batch_size=2, statistics=str(tmp_path / "statistics.json"))
    results = evaluate(fastv, tasks, ["shapesworld_pope"])
    model, processor = stock
    rcpp_model = fastv.model  # the same weights as `stock`, as rcpp_hf's class: the method runs in its generate
    direct = [direct_answer(rcpp_model, processor, sample, image_of(fastv, "shapesworld_pope", sample),
                            RCPPGenerationConfig(rcpp=False, methods=[load_method("fastv", budget=0.33)]))
              for sample in results["samples"]["shapesworld_pope"]]  # fmt: skip
    assert answers(results)["shapesworld_pope"] == direct

    stats = fastv.statistics["shapesworld_pope"]
    num_layers = model.config.text_config.num_hidden_layers
    # FastV's budget is the mean over layers: 100 visual tokens before its layer, R after, R rounded to reach 33.
    per_layer = stats["visual_tokens_per_layer"]
    assert per_layer[0] == 100 and len(set(per_layer[1:])) == 1 and per_layer[-1] < 100
    assert per_layer == visual_tokens_per_layer({1: per_layer[-1]}, num_layers, 100)
    assert stats["visual_tokens"] == pytest.approx(sum(per_layer) / num_layers)
    assert abs(stats["visual_tokens"] - 33) < 1 and stats["visual_tokens_input"] == 100
    assert stats["prefill_ms"] > 0 and stats["kv_bytes"] > stats["visual_kv_bytes"] > 0
    assert stats["requests"] == len(results["samples"]["shapesworld_pope"])
    # ... in lmms-eval's results and in the statistics file
    assert results["throughput"]["avg_shapesworld_pope/visual_tokens"] == pytest.approx(stats["visual_tokens"])
    written = json.loads((tmp_path / "statistics.json").read_text())
    assert written["tasks"]["shapesworld_pope"]["visual_tokens_per_layer"] == per_layer


def test_no_method_computes_every_visual_token(lm, tasks):
    evaluate(lm, tasks, ["shapesworld_textvqa"])
    stats = lm.statistics["shapesworld_textvqa"]
    assert stats["visual_tokens"] == 100 and stats["visual_kv_bytes"] is None  # a plain DynamicCache


def test_clean_keeps_the_model_for_a_second_evaluation(lm, tasks):
    first = evaluate(lm, tasks, ["shapesworld_gqa"])
    second = evaluate(lm, tasks, ["shapesworld_gqa"])
    assert answers(first) == answers(second)
    assert first["results"]["shapesworld_gqa"] == second["results"]["shapesworld_gqa"]


def test_multiple_choice_by_loglikelihood(lm, tasks, stock):
    results = evaluate(lm, tasks, ["shapesworld_choice"])
    model, processor = stock
    for sample in results["samples"]["shapesworld_choice"]:
        losses = [response[0][0] for response in sample["resps"]]
        arguments = sample["arguments"]  # each choice's request, flattened: context, continuation, doc id, task, split
        for context, continuation, loss in zip(arguments[::5], arguments[1::5], losses):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
            inputs = processor(images=image_of(lm, "shapesworld_choice", sample), text=prompt + continuation,
                               return_tensors="pt")  # fmt: skip
            target = inputs["input_ids"][0, -1]  # each shape's name is one token
            with torch.inference_mode():
                logits = model(**inputs).logits[0, -2]
            assert loss == pytest.approx(-logits.log_softmax(-1)[target].item(), abs=1e-4)
        assert sample["acc"] == float(min(range(len(losses)), key=losses.__getitem__) == sample["doc"]["answer"])

    # With a method, the first new token's logits of its generate: FastV keeping every token changes nothing.
    neutral = RCPPLmms(method="fastv", keep=100, batch_size=3)
    neutral_results = evaluate(neutral, tasks, ["shapesworld_choice"])
    for ours, theirs in zip(neutral_results["samples"]["shapesworld_choice"], results["samples"]["shapesworld_choice"]):
        assert [r[0][0] for r in ours["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-4)


def resized_pope_tasks(folder, sizes):
    """shapesworld_pope in `folder` with its images resized to the (width, height) `sizes` in turn."""
    import datasets
    from lmms_eval.tasks import TaskManager

    write_tasks(folder, num_images=1, formats=("pope",))
    data = folder / "shapesworld_pope" / "data" / "test.parquet"
    table = datasets.Dataset.from_parquet(str(data))
    rows = [{**row, "image": row["image"].resize(sizes[index % len(sizes)])} for index, row in enumerate(table)]
    datasets.Dataset.from_list(rows, features=table.features).to_parquet(data)
    return folder, TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def next_tasks(tmp_path_factory):
    """shapesworld_pope with the two image sizes of RAGGED_SIZES: on the tiny LLaVA-NeXT, anyres images of 52 and
    56 visual tokens."""
    return resized_pope_tasks(tmp_path_factory.mktemp("lmms-next-tasks"), RAGGED_SIZES)


@pytest.fixture(scope="module")
def qwen_tasks(tmp_path_factory):
    """shapesworld_pope with the two image sizes of QWEN_RAGGED_SIZES (given as height, width): on the tiny
    Qwen2.5-VL, 15 and 20 visual tokens."""
    sizes = [(width, height) for height, width in QWEN_RAGGED_SIZES]
    return resized_pope_tasks(tmp_path_factory.mktemp("lmms-qwen-tasks"), sizes)


@pytest.mark.parametrize("method", [None, "fastv"])
def test_llava_next_rows_of_different_image_sizes(anyres_paths, next_tasks, method):
    """The tiny LLaVA-NeXT (random weights) through simple_evaluate, all six requests in one batch whose rows hold
    52 or 56 visual tokens: each answer is `generate`'s on that request alone, and each request's statistics are
    its own row's (FastV at a budget of half the image keeps 17 of 52 and 19 of 56 tokens from its layer on)."""
    path = anyres_paths["llava_next"]
    settings = {} if method is None else {"method": method, "budget": 0.5}
    lm = RCPPLmms(pretrained=str(path), batch_size=6, **settings)
    assert lm.image_aspect == "crop"  # the anyres family's default: the image tiled as it is
    results = evaluate(lm, next_tasks, ["shapesworld_pope"])
    samples = results["samples"]["shapesworld_pope"]
    assert len(samples) == 6

    config = RCPPGenerationConfig(rcpp=False, methods=[] if method is None else [load_method(method, budget=0.5)],
                                  do_sample=False, max_new_tokens=8, return_dict_in_generate=True)  # fmt: skip
    num_layers = lm.model.config.text_config.num_hidden_layers
    direct, counts, per_layer = [], [], []
    for sample in samples:
        image = image_of(lm, "shapesworld_pope", sample)
        prompt = chat_prompt(lm.processor, sample["arguments"][0])
        assert prompt == f"USER: <image>\n{sample['arguments'][0]} ASSISTANT:"  # the checkpoint's chat template
        inputs = lm.processor(images=image, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = lm.model.generate(**inputs, generation_config=copy.deepcopy(config))
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        direct.append(lm.processor.decode(new, skip_special_tokens=True).strip())
        counts.append(int((inputs["input_ids"] == lm.model.config.image_token_id).sum()))
        kept = {record.layer: record.kept for record in getattr(out, "pruning", None) or []}
        per_layer.append(visual_tokens_per_layer(kept, num_layers, counts[-1]))
    assert sorted(counts) == [52] * 3 + [56] * 3
    assert answers(results)["shapesworld_pope"] == direct

    stats = lm.statistics["shapesworld_pope"]
    assert stats["visual_tokens_input"] == pytest.approx(54)
    assert stats["visual_tokens_per_layer"] == pytest.approx([sum(column) / 6 for column in zip(*per_layer)])
    if method is None:
        assert stats["visual_tokens"] == pytest.approx(54)
    else:
        assert sorted({layers[-1] for layers in per_layer}) == [17, 19]  # the rows kept different counts
        assert stats["visual_tokens"] == pytest.approx(sum(sum(layers) for layers in per_layer) / 6 / num_layers)


@pytest.mark.parametrize("method", [None, "fastv"])
def test_qwen2_5_vl_rows_of_different_image_sizes(qwen_paths, qwen_tasks, method):
    """The tiny Qwen2.5-VL (random weights, dynamic resolution) through simple_evaluate, all six requests in one
    batch whose rows hold 15 or 20 visual tokens: each answer is `generate`'s on that request alone in Qwen's chat
    template, and each request's statistics are its own row's (FastV at a budget of half the image keeps 6 of 15
    and 7 of 20 tokens from its layer on)."""
    from rcpp_hf.tiny_qwen import QWEN_IMAGE

    settings = {} if method is None else {"method": method, "budget": 0.5}
    lm = RCPPLmms(pretrained=str(qwen_paths["qwen2_5_vl"]), batch_size=6, **settings)
    assert lm.image_aspect == "crop"  # Qwen resizes the image as it is
    results = evaluate(lm, qwen_tasks, ["shapesworld_pope"])
    samples = results["samples"]["shapesworld_pope"]
    assert len(samples) == 6

    config = RCPPGenerationConfig(rcpp=False, methods=[] if method is None else [load_method(method, budget=0.5)],
                                  do_sample=False, max_new_tokens=8, return_dict_in_generate=True)  # fmt: skip
    num_layers = lm.model.config.text_config.num_hidden_layers
    direct, counts, per_layer = [], [], []
    for sample in samples:
        image = image_of(lm, "shapesworld_pope", sample)
        prompt = chat_prompt(lm.processor, sample["arguments"][0])
        assert prompt == f"<|im_start|>user\n{QWEN_IMAGE}{sample['arguments'][0]}<|im_end|>\n<|im_start|>assistant\n"
        inputs = lm.processor(images=image, text=prompt, return_tensors="pt")
        assert "mm_token_type_ids" in inputs
        with torch.inference_mode():
            out = lm.model.generate(**inputs, generation_config=copy.deepcopy(config))
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        direct.append(lm.processor.decode(new, skip_special_tokens=True).strip())
        counts.append(int((inputs["input_ids"] == lm.model.config.image_token_id).sum()))
        kept = {record.layer: record.kept for record in getattr(out, "pruning", None) or []}
        per_layer.append(visual_tokens_per_layer(kept, num_layers, counts[-1]))
    assert sorted(counts) == [15] * 3 + [20] * 3
    assert answers(results)["shapesworld_pope"] == direct
    assert len(set(direct)) > 1  # the answers depend on the request

    stats = lm.statistics["shapesworld_pope"]
    assert stats["visual_tokens_input"] == pytest.approx(17.5)
    assert stats["visual_tokens_per_layer"] == pytest.approx([sum(column) / 6 for column in zip(*per_layer)])
    if method is None:
        assert stats["visual_tokens"] == pytest.approx(17.5)
    else:
        assert sorted({layers[-1] for layers in per_layer}) == [6, 7]  # the rows kept different counts
        assert stats["visual_tokens"] == pytest.approx(sum(sum(layers) for layers in per_layer) / 6 / num_layers)


@pytest.mark.parametrize("model_args, named", [
    (dict(pretrained="/no/such/folder"), "pretrained=/no/such/folder"),
    (dict(method="nosuch"), "method=nosuch"),
    (dict(method="fastv", budget=1.5), "method=fastv"),
    (dict(method="fastv", bogus=1), "method=fastv"),
    (dict(budget=64), "budget=64"),
    (dict(config="nosuch_preset"), "config=nosuch_preset"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size="auto"), "batch_size=auto"),
    (dict(dtype="float8"), "dtype=float8"),
    (dict(image_aspect="stretch"), "image_aspect=stretch"),
    (dict(device="tpu"), "device=tpu"),
])  # fmt: skip
def test_bad_model_args_refuse_in_one_line(model_args, named):
    with pytest.raises(ModelArgsError) as error:
        RCPPLmms(**model_args)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"rcpp_hf model_args {named}")


def test_multi_round_requests_are_refused(lm):
    with pytest.raises(NotImplementedError, match="single-turn"):
        lm.generate_until_multi_round([])


def lmms_eval_command(tasks, output, model_args, *options):
    folder, _ = tasks
    return ["-m", "lmms_eval", "--model", "rcpp_hf", "--model_args", model_args, "--include_path", str(folder),
            "--tasks", "shapesworld_pope", "--output_path", str(output), "--log_samples", "--verbosity", "WARNING",
            *options]  # fmt: skip


def read_run(output) -> tuple[dict, list[str]]:
    """(results, answers in document order) of a command-line run's output folder."""
    results = json.loads(next(output.rglob("*_results.json")).read_text())
    lines = next(output.rglob("*samples_shapesworld_pope.jsonl")).read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda sample: sample["doc_id"])
    return results, [sample["filtered_resps"] for sample in samples]  # the file keeps the answer as filtered


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_command_line_and_two_processes_answer_what_simple_evaluate_answers(lm, tasks, tmp_path):
    """`lmms-eval --model rcpp_hf` finds the model by its entry point; `accelerate launch` with two CPU processes
    (gloo) shards the documents and gives the answers of one process."""
    reference = evaluate(lm, tasks, ["shapesworld_pope"])
    env = {**os.environ, **OFFLINE}
    one = subprocess.run([sys.executable, *lmms_eval_command(tasks, tmp_path / "one", "batch_size=3")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    results, one_answers = read_run(tmp_path / "one")
    assert one_answers == answers(reference)["shapesworld_pope"]
    assert results["results"]["shapesworld_pope"] == reference["results"]["shapesworld_pope"]
    assert results["throughput"]["avg_shapesworld_pope/visual_tokens"] == 100

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # fmt: skip
    statistics = tmp_path / "two" / "statistics.json"
    # lmms-eval's Accelerator joins CPU processes (gloo) when the environment says CPU
    command = lmms_eval_command(tasks, tmp_path / "two", f"batch_size=3,statistics={statistics}")
    two = subprocess.run([*launch, *command],
                         capture_output=True, text=True, timeout=300, env={**env, "ACCELERATE_USE_CPU": "1"},
                         cwd=tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    results, two_answers = read_run(tmp_path / "two")
    assert two_answers == one_answers
    assert results["results"]["shapesworld_pope"] == reference["results"]["shapesworld_pope"]
    # The statistics are every process's: one request per document.
    assert json.loads(statistics.read_text())["tasks"]["shapesworld_pope"]["requests"] == len(two_answers)

