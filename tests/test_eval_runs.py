"""End-to-end runs on the tiny model: POPE (the committed excerpt), CHAIR and MME, resume, extension, bad input, report."""

import json

import pytest

import rcpp_hf.eval.harness as run_module
from rcpp_hf.cli import main
from rcpp_hf.eval.answerer import LLAVA_SYSTEM_PROMPT, Answer, Answerer
from rcpp_hf.eval.chair import evaluate_chair
from rcpp_hf.eval.mme import evaluate_mme
from rcpp_hf.eval.pope import (
    DEFAULT_PROMPT,
    evaluate_pope,
    parse_yes_no,
    summarize_pope,
)
from tests.eval_helpers import (
    options,
    read_jsonl,
    two_image_annotations,
    without_timing,
    write_mme,
    write_pope_parquet,
)

RCPP_DEFAULT = "rcpp_default"  # the shipped generation preset


def test_pope_from_the_command_line(varied_tiny_path, pope_files, tmp_path):
    (adversarial, random), images = pope_files
    out = tmp_path / "run"
    argv = ["eval", "pope", "--question-file", str(adversarial), str(random), "--image-folder", str(images)]
    argv += ["--output-dir", str(out), "--model", str(varied_tiny_path), "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0

    answers = read_jsonl(out / "answers.jsonl")
    assert [a["id"] for a in answers] == [f"coco_pope_adversarial/{i}" for i in range(1, 13)] + [
        f"coco_pope_random/{i}" for i in range(1, 13)
    ]
    assert len({a["answer"] for a in answers}) > 1  # the images differ, so do the answers
    assert all(a["prediction"] == parse_yes_no(a["answer"]) and 1 <= a["num_tokens"] <= 4 for a in answers)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["splits"]) == ["coco_pope_adversarial", "coco_pope_random"]
    assert {k: metrics[k] for k in ("splits", "average", "headline")} == summarize_pope(answers)
    assert metrics["n"] == 24 and metrics["latency"]["tokens_per_item"] > 0

    config = json.loads((out / "config.json").read_text())
    identity, session = config["identity"], config["sessions"][0]
    assert identity["prompt"] == {"system": LLAVA_SYSTEM_PROMPT, "user": DEFAULT_PROMPT}
    # without --config: plain greedy LLaVA decoding
    assert identity["generation_config"]["rcpp"] is False and identity["generation_config"]["do_sample"] is False
    assert identity["generation_config"]["max_new_tokens"] == 4 and identity["decoding_config_file"] is None
    assert (identity["seed"], identity["image_aspect"], identity["model"]) == (0, "pad", str(varied_tiny_path))
    assert session["versions"]["transformers"] == "5.23.0" and session["batch_size"] == 4

    # A finished run is not asked again: rerunning only rewrites the metrics.
    calls = []
    original = Answerer.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Answerer, "__call__", lambda self, *args: calls.append(1) or original(self, *args))
        assert main(argv) == 0
    assert calls == [] and without_timing(read_jsonl(out / "answers.jsonl")) == without_timing(answers)


def test_batched_answers_equal_one_at_a_time(varied_tiny_path, pope_files, tmp_path):
    files, images = pope_files
    batched = evaluate_pope(files, images, options(varied_tiny_path, tmp_path / "batched", batch_size=5))
    single = evaluate_pope(files, images, options(varied_tiny_path, tmp_path / "single", batch_size=1))
    assert without_timing(read_jsonl(tmp_path / "batched" / "answers.jsonl")) == without_timing(
        read_jsonl(tmp_path / "single" / "answers.jsonl")
    )
    assert batched["splits"] == single["splits"]


def test_resume_after_a_crash_loses_nothing_and_redoes_nothing(varied_tiny_path, pope_files, tmp_path, monkeypatch):
    files, images = pope_files
    evaluate_pope(files, images, options(varied_tiny_path, tmp_path / "uninterrupted"))

    out = tmp_path / "crashed"
    answered = []
    original = Answerer.__call__

    def crash_on_third_batch(self, images, prompts):
        if len(answered) == 8:
            raise KeyboardInterrupt("simulated crash")
        answered.extend(prompts)
        return original(self, images, prompts)

    monkeypatch.setattr(Answerer, "__call__", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_pope(files, images, options(varied_tiny_path, out))
    part = out / "answers.part-0.jsonl"
    assert len(read_jsonl(part)) == 8 and not (out / "metrics.json").exists()
    with open(part, "a") as handle:  # the crash also cut the next record in half
        handle.write('{"id": "coco_pope_adversarial/9", "spl')

    answered.clear()

    def count(self, images, prompts):
        answered.extend(prompts)
        return original(self, images, prompts)

    monkeypatch.setattr(Answerer, "__call__", count)
    evaluate_pope(files, images, options(varied_tiny_path, out))
    assert len(answered) == 16  # only what was not on disk
    assert without_timing(read_jsonl(out / "answers.jsonl")) == without_timing(
        read_jsonl(tmp_path / "uninterrupted" / "answers.jsonl")
    )
    assert len(json.loads((out / "config.json").read_text())["sessions"]) == 2


def test_a_run_directory_refuses_another_configuration(varied_tiny_path, tiny_path, pope_files, tmp_path):
    files, images = pope_files
    run = tmp_path / "run"
    evaluate_pope(files, images, options(varied_tiny_path, run, limit=4))
    with pytest.raises(ValueError, match=r"config.json: this run directory holds a run with a different prompt"):
        evaluate_pope(files, images, options(varied_tiny_path, run, limit=4), prompt="{question} Yes or no?")
    with pytest.raises(ValueError, match="different generation_config, seed"):
        evaluate_pope(files, images, options(varied_tiny_path, run, limit=4, seed=1, max_new_tokens=2))
    # Another limit is no excuse for another identity.
    with pytest.raises(ValueError, match="different inputs;"):
        evaluate_pope(files[:1], images, options(varied_tiny_path, run, limit=8))
    with pytest.raises(ValueError, match="different model;"):
        evaluate_pope(files, images, options(tiny_path, run, limit=8))
    with pytest.raises(ValueError, match="different decoding_config_file, generation_config;"):
        evaluate_pope(files, images, options(varied_tiny_path, run, limit=8, config=RCPP_DEFAULT))


def test_a_larger_limit_extends_the_run(varied_tiny_path, pope_files, tmp_path, monkeypatch):
    files, images = pope_files  # 24 questions: 12 adversarial, then 12 random
    whole = evaluate_pope(files, images, options(varied_tiny_path, tmp_path / "whole"))
    asked = []
    original = Answerer.__call__

    def count(self, images, prompts):
        asked.extend(prompts)
        return original(self, images, prompts)

    monkeypatch.setattr(Answerer, "__call__", count)
    out = tmp_path / "extended"
    evaluate_pope(files, images, options(varied_tiny_path, out, limit=12))
    first = read_jsonl(out / "answers.jsonl")
    assert [a["id"] for a in first] == [f"coco_pope_adversarial/{i}" for i in range(1, 13)] and len(asked) == 12

    asked.clear()
    extended = evaluate_pope(files, images, options(varied_tiny_path, out, limit=24))
    assert len(asked) == 12  # only the new questions
    answers = read_jsonl(out / "answers.jsonl")
    assert answers[:12] == first  # kept as they were, timing included
    assert without_timing(answers) == without_timing(read_jsonl(tmp_path / "whole" / "answers.jsonl"))
    assert extended["splits"] == whole["splits"]
    sessions = json.loads((out / "config.json").read_text())["sessions"]
    assert [session["limit"] for session in sessions] == [12, 24]

    asked.clear()
    shrunk = evaluate_pope(files, images, options(varied_tiny_path, out, limit=6))
    assert asked == [] and shrunk["n"] == 6  # back to fewer items: scored from what is on disk


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: bad input must be refused before any model work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_module, "load_model", refuse)


def test_bad_input_is_named_before_any_model_work(no_model, varied_tiny_path, pope_files, tmp_path, make_image_files):
    (adversarial, random), images = pope_files
    out = tmp_path / "run"
    (images / "COCO_val2014_000000310196.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image files not found: .*val2014/COCO_val2014_000000310196.jpg"):
        evaluate_pope([adversarial], images, options(varied_tiny_path, out))
    make_image_files(images, ["COCO_val2014_000000310196.jpg"])
    unknown = tmp_path / "questions.csv"
    unknown.write_text("question_id,image\n")
    with pytest.raises(ValueError, match=r"questions.csv: unknown question-file format"):
        evaluate_pope([unknown], images, options(varied_tiny_path, out))
    with pytest.raises(FileNotFoundError, match=r"question file not found: .*coco_pope_popular.json"):
        evaluate_pope([tmp_path / "coco_pope_popular.json"], images, options(varied_tiny_path, out))
    with pytest.raises(ValueError, match="pass --image-folder"):
        evaluate_pope([random], None, options(varied_tiny_path, out))
    with pytest.raises(ValueError, match=r"prompt template .* must contain \{question\}"):
        evaluate_pope([random], images, options(varied_tiny_path, out), prompt="Is there an object?")
    with pytest.raises(FileNotFoundError, match=r"generation \(RCPP\) preset file not found: .*missing.yaml"):
        evaluate_pope([random], images, options(varied_tiny_path, out, config=tmp_path / "missing.yaml"))
    listed = tmp_path / "list.yaml"
    listed.write_text("- do_sample\n")
    with pytest.raises(ValueError, match=r"list.yaml: expected a mapping of settings"):
        evaluate_pope([random], images, options(varied_tiny_path, out, config=listed))
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("gamma: 2.0\n")
    with pytest.raises(ValueError, match=r"RCPPGenerationConfig.gamma = 2.0"):
        evaluate_pope([random], images, options(varied_tiny_path, out, config=invalid))
    with pytest.raises(FileNotFoundError, match=r"instances_val2014.json.*not found"):
        evaluate_chair(images, tmp_path / "val2014", options(varied_tiny_path, out))
    annotations = two_image_annotations(tmp_path / "annotations")
    with pytest.raises(FileNotFoundError, match=r"2 image files not found: .*COCO_val2014_000000000042.jpg"):
        evaluate_chair(tmp_path / "empty", annotations, options(varied_tiny_path, out), num_images=2)
    with pytest.raises(FileNotFoundError, match="MME folder not found"):
        evaluate_mme(tmp_path / "MME", options(varied_tiny_path, out))
    assert not out.exists()


class ScriptedAnswerer:
    """Stands in for Answerer: answers by image width, so a test knows every description."""

    captions = {
        40: "A man and his dog sit on a bench next to a fire hydrant. Two cats sleep nearby.",
        30: "A pizza on a plate.",
    }

    def __init__(self, *args):
        pass

    def __call__(self, images, prompts):
        return [Answer(self.captions[image.size[0]], 9) for image in images]


def test_chair_run_scores_the_descriptions(varied_tiny_path, tmp_path, make_image_files, monkeypatch):
    annotations = two_image_annotations(tmp_path / "annotations")
    make_image_files(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg"], size=(40, 30))
    make_image_files(tmp_path / "val2014", ["COCO_val2014_000000000073.jpg"], size=(30, 40))
    monkeypatch.setattr(run_module, "load_model", lambda *args: (None, None))
    monkeypatch.setattr(run_module, "Answerer", ScriptedAnswerer)
    metrics = evaluate_chair(tmp_path / "val2014", annotations, options(varied_tiny_path, tmp_path / "run"), num_images=2)
    # the hand counts of test_eval_chair.test_chair_metrics_against_hand_counts
    assert metrics["headline"] == pytest.approx({"chair_s": 1 / 2, "chair_i": 2 / 6, "recall": 4 / 5, "length": 12.5})
    first, second = read_jsonl(tmp_path / "run" / "answers.jsonl")
    assert (first["image_id"], second["image_id"]) == (42, 73)
    assert first["hallucinated"] == [["fire hydrant", "fire hydrant"], ["cat", "cat"]]
    assert first["ground_truth"] == ["bench", "dog", "person"]
    identity = json.loads((tmp_path / "run" / "config.json").read_text())["identity"]
    assert identity["inputs"]["image_ids"] == [42, 73] and identity["inputs"]["image_seed"] == 0
    assert identity["prompt"]["user"] == "Please describe this image in detail."
    assert identity["generation_config"]["max_new_tokens"] == 4


def test_chair_and_mme_from_the_command_line(varied_tiny_path, tmp_path, make_image_files):
    annotations = two_image_annotations(tmp_path / "annotations")
    make_image_files(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"])
    ids = tmp_path / "ids.txt"
    ids.write_text("73\n")
    run = ["--model", str(varied_tiny_path), "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["eval", "chair", "--image-folder", str(tmp_path / "val2014"), "--annotations", str(annotations),
                 "--image-ids", str(ids), "--output-dir", str(tmp_path / "chair"), *run]) == 0
    (answer,) = read_jsonl(tmp_path / "chair" / "answers.jsonl")
    assert answer["image_id"] == 73 and answer["ground_truth"] == ["dining table", "pizza"]
    assert json.loads((tmp_path / "chair" / "metrics.json").read_text())["n_captions"] == 1

    mme_root = write_mme(tmp_path / "MME", make_image_files)
    assert main(["eval", "mme", "--mme-root", str(mme_root), "--subtasks", "existence", "artwork",
                 "--output-dir", str(tmp_path / "mme"), "--batch-size", "3", *run]) == 0
    answers = read_jsonl(tmp_path / "mme" / "answers.jsonl")
    assert [a["id"] for a in answers][:2] == ["existence/a/0", "existence/a/1"] and len(answers) == 6
    metrics = json.loads((tmp_path / "mme" / "metrics.json").read_text())
    assert sorted(metrics["subtasks"]) == ["artwork", "existence"]
    assert metrics["totals"]["perception"]["complete"] is False


def test_pope_from_lmms_lab_parquet(varied_tiny_path, tmp_path, make_image_files):
    image = make_image_files(tmp_path / "images", ["x.jpg"])[0]
    rows = [(str(i), f"Is there a {name} in the image?", label, "x", split)
            for split in ("adversarial", "random")
            for i, (name, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "no")], start=1)]
    write_pope_parquet(tmp_path / "POPE" / "data" / "test-00000-of-00001.parquet", rows, image.read_bytes())
    metrics = evaluate_pope([tmp_path / "POPE"], None, options(varied_tiny_path, tmp_path / "run"))
    assert list(metrics["splits"]) == ["adversarial", "random"] and metrics["n"] == 6


def test_report_tables_and_plots(varied_tiny_path, pope_files, tmp_path, capsys):
    files, images = pope_files
    runs = tmp_path / "runs"
    evaluate_pope(files, images, options(varied_tiny_path, runs / "greedy", limit=6))
    evaluate_pope(files, images, options(varied_tiny_path, runs / "rcpp", limit=6, config=RCPP_DEFAULT))
    identity = json.loads((runs / "rcpp" / "config.json").read_text())["identity"]
    assert identity["generation_config"]["rcpp"] is True and identity["generation_config"]["lambda_end"] == 0.5
    (runs / "unfinished").mkdir()  # a run without metrics.json is left out
    assert main(["report", str(runs)]) == 0
    report = (runs / "report.md").read_text()
    assert report in capsys.readouterr().out
    lines = report.splitlines()
    assert lines[0] == "## pope"
    assert lines[2] == "| run | model | decoding | n | accuracy | f1 | yes_ratio | s/item | tokens/item |"
    assert lines[4].startswith(f"| greedy | {varied_tiny_path.name} | greedy | 6 |")
    assert lines[5].startswith(f"| rcpp | {varied_tiny_path.name} | RCPP + DRCD | 6 |")  # rcpp_default.yaml: the defaults
    # then the differences to the one greedy run, with their intervals
    assert "greedy" in "\n".join(lines[6:]) and any(line.startswith("| rcpp |") for line in lines[6:])
    assert (runs / "report_pope.png").stat().st_size > 1000
