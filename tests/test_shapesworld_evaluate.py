"""`rcpp-hf eval shapesworld`: records, metrics, resume after a crash, refusal to mix runs, RCPP presets."""

import json
from dataclasses import replace

import pytest

from rcpp_hf.cli.eval import add_shapesworld_parser
from rcpp_hf.shapesworld import evaluate as evaluate_module
from rcpp_hf.shapesworld.evaluate import EvalSettings, evaluate
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava

# Random weights: this file tests the machinery; the shipped model's competence is tested elsewhere.
SMALL = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1,
                text_hidden=32, text_layers=4, num_heads=4, num_kv_heads=2)  # fmt: skip


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-shapesworld")
    model, processor = build_shapesworld_llava(SMALL)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def read_records(folder):
    return [json.loads(line) for line in (folder / "answers.part-0.jsonl").read_text().splitlines()]


def test_pope_run_resumes_after_a_crash_without_redoing_work(small_model, tmp_path, monkeypatch):
    settings = EvalSettings(model=small_model, split="adversarial", num_images=3, limit=10, batch_size=4, max_new_tokens=2)
    real = evaluate_module.generate_answers
    calls = []

    def crash_on_third_batch(model, processor, images, prompts, config):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(model, processor, images, prompts, config)

    monkeypatch.setattr(evaluate_module, "generate_answers", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(settings, tmp_path, progress=False)
    assert [r["id"] for r in read_records(tmp_path)] == [f"adversarial/{i}" for i in range(1, 9)]

    calls.clear()
    metrics = evaluate(settings, tmp_path, progress=False)
    assert calls == [2]  # only the 2 questions left
    records = read_records(tmp_path)
    assert [r["id"] for r in records] == [f"adversarial/{i}" for i in range(1, 11)]
    assert metrics["n"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0
    for r in records:
        assert r["prediction"] in ("yes", "no") and r["label"] in ("yes", "no")
        assert r["prompt"].endswith("Answer the question using a single word or phrase.")
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 10

    calls.clear()
    evaluate(settings, tmp_path, progress=False)
    assert calls == []  # all done: nothing generated again


def test_the_split_is_written_in_pope_format_with_images(small_model, tmp_path):
    evaluate(EvalSettings(model=small_model, split="random", num_images=2, max_new_tokens=1), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "data" / "shapesworld_pope_random.json").read_text().splitlines()]
    assert len(rows) == 12 and all((tmp_path / "data" / "images" / r["image"]).is_file() for r in rows)


def test_a_run_with_other_settings_is_refused(small_model, tmp_path):
    evaluate(EvalSettings(model=small_model, split="random", num_images=1, max_new_tokens=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(EvalSettings(model=small_model, split="random", num_images=2, max_new_tokens=1), tmp_path, progress=False)


def test_a_larger_limit_extends_the_run(small_model, tmp_path, monkeypatch):
    real = evaluate_module.generate_answers
    asked = []

    def count(model, processor, images, prompts, config):
        asked.extend(prompts)
        return real(model, processor, images, prompts, config)

    monkeypatch.setattr(evaluate_module, "generate_answers", count)
    settings = EvalSettings(model=small_model, split="popular", num_images=5, limit=12, batch_size=8, max_new_tokens=2)
    evaluate(settings, tmp_path, progress=False)
    first = read_records(tmp_path)
    assert len(asked) == 12

    asked.clear()
    metrics = evaluate(replace(settings, limit=24), tmp_path, progress=False)
    assert len(asked) == 12  # only the new questions
    records = read_records(tmp_path)
    assert records[:12] == first and [r["id"] for r in records] == [f"popular/{i}" for i in range(1, 25)]
    assert metrics["n"] == 24 and metrics["limit"] == 24
    # The limit is no excuse for other settings.
    for other in (dict(seed=3), dict(max_new_tokens=3), dict(config="rcpp_evict")):
        with pytest.raises(ValueError, match="other settings|other generation_config"):
            evaluate(replace(settings, limit=30, **other), tmp_path, progress=False)
    assert len(asked) == 12


def test_captions_with_an_rcpp_preset_record_chair_counts_and_kept_tokens(small_model, tmp_path):
    settings = EvalSettings(model=small_model, split="captions", config="rcpp_evict",
                            num_images=3, batch_size=3, max_new_tokens=12)  # fmt: skip
    metrics = evaluate(settings, tmp_path, progress=False)
    assert set(metrics) >= {"chair_s", "chair_i", "recall", "length", "partner_hallucination", "visual_kept"}
    assert metrics["run"]["generation_config"]["keep_ratio_end"] == 0.25
    for record in read_records(tmp_path):
        assert record["lone_kinds"]  # caption scenes all hold a kind without its partner
        assert 0.0 < record["visual_kept"] <= 1.0


def test_mme_split_records_mme_predictions_and_scores(small_model, tmp_path):
    settings = EvalSettings(model=small_model, split="mme", num_images=2, batch_size=8, max_new_tokens=1)
    metrics = evaluate(settings, tmp_path, progress=False)
    records = read_records(tmp_path)
    assert len(records) == 16  # 2 images x 4 subtasks x (yes, no)
    assert {r["subtask"] for r in records} == {"existence", "count", "position", "color"}
    for r in records:
        assert r["prediction"] in ("yes", "no", "other") and r["label"] in ("yes", "no")
        assert r["prompt"].endswith("?\nAnswer the question using a single word or phrase.")  # MME's instruction stripped
    for subtask in ("existence", "count", "position", "color"):
        mine = [r for r in records if r["subtask"] == subtask]
        assert metrics[f"{subtask}_acc"] == sum(r["prediction"] == r["label"] for r in mine) / 4
        assert metrics["subtasks"][subtask]["n_images"] == 2
    assert metrics["score"] == sum(s["score"] for s in metrics["subtasks"].values())


@pytest.mark.parametrize("field, value", [("split", "hard"), ("num_images", 0), ("limit", 0), ("batch_size", 0)])
def test_settings_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EvalSettings(**{"model": "m", "split": "random", field: value})


def test_eval_sub_command(small_model, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="rcpp-hf eval")
    add_shapesworld_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["shapesworld", "--split", "popular", "--model", small_model, "--num-images", "1",
                              "--limit", "4", "--max-new-tokens", "1", "--output-dir", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    assert '"n": 4' in capsys.readouterr().out
    assert len(read_records(tmp_path)) == 4
