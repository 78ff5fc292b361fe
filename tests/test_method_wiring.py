"""The registry's methods from every entry point: `--method` / `--method-config` parsing, generate, eval identities,
bench on the tiny shape, and the shipped method presets."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from rcpp_hf.benchmark.flops import prefill_flops, prefill_flops_ratio
from rcpp_hf.benchmark.model_sizes import load_benchmark_model
from rcpp_hf.benchmark.suite import (
    BenchmarkSettings,
    method_generation_config,
    run_speed_benchmark,
)
from rcpp_hf.cli import build_parser, main
from rcpp_hf.cli.generate import setting_label
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.engine.pruning import PruneStage
from rcpp_hf.eval.mme import evaluate_mme
from rcpp_hf.methods import FastV, load_method
from rcpp_hf.run_config import (
    build_generation_config,
    load_method_preset,
    read_method_yaml,
)
from tests.cli_helpers import user_error
from tests.eval_helpers import options, read_jsonl, write_mme


def test_presets_load_by_path():
    for budget in (64, 128, 192):
        method = load_method(f"fastv_{budget}of576")
        assert method == FastV(budget=budget / 576)
    # 576 tokens, 32 layers, K = 2: FinePruner's R_dict
    assert [load_method(f"fastv_{b}of576").resolve_stages(32, 576)[0].keep for b in (64, 128, 192)] == [
        30, 98, 166]


def test_method_arguments(tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("budget: 3\nquery: all\n")
    preset = "fastv_64of576"
    assert load_method_preset(None, None) is None
    assert load_method_preset("fastv", None) == FastV()
    assert load_method_preset(None, preset) == FastV(budget=64 / 576)
    assert load_method_preset("fastv", preset) == FastV(budget=64 / 576)
    assert load_method_preset("fastv", settings) == FastV(budget=3, query="all")
    with pytest.raises(ValueError, match="no 'method' key: name the method with --method"):
        load_method_preset(None, settings)
    other = tmp_path / "other.yaml"
    other.write_text("method: sparsevlm\n")
    with pytest.raises(ValueError, match="--method fastv conflicts with .*other.yaml, a preset of method 'sparsevlm'"):
        read_method_yaml(other, "fastv")
    with pytest.raises(ValueError, match=r"FastV.query = 'first'"):
        load_method_preset("fastv", _write(tmp_path / "bad.yaml", {"query": "first"}))
    with pytest.raises(FileNotFoundError, match="method preset file not found"):
        load_method_preset("fastv", tmp_path / "missing.yaml")
    args = build_parser().parse_args(["eval", "mme", "--mme-root", "x", "--output-dir", "y", "--method", "fastv",
                                      "--method-config", str(preset)])  # fmt: skip
    assert (args.method, args.method_config) == ("fastv", str(preset))


def _write(path, values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_unknown_method_lists_the_known_ones(tmp_path, capsys):
    user_error(capsys, ["generate", "--method", "fastw"],
               "^rcpp-hf generate: error: unknown method 'fastw'; known methods: .*fastv")
    user_error(capsys, ["eval", "shapesworld", "--split", "random", "--output-dir", str(tmp_path), "--method", "fastw"],
               "^rcpp-hf eval shapesworld: error: unknown method 'fastw'; known methods: .*fastv")
    with pytest.raises(ValueError, match=r"unknown \['fastw'\]; known: vanilla, .*rcpp-evict, .*fastv, .*vcd, .*fastv\+rcpp"):
        BenchmarkSettings(methods=("vanilla", "fastw"))


def test_a_method_joins_the_decoding_config(tiny_path):
    alone = build_generation_config(None, FastV(budget=4), max_new_tokens=5)
    assert alone.rcpp is False and alone.methods == (FastV(budget=4),) and alone.max_new_tokens == 5
    composed = build_generation_config("rcpp_default", FastV(budget=4), max_new_tokens=5)
    assert composed.rcpp is True and composed.methods == (FastV(budget=4),)
    assert setting_label(composed) == "RCPP + DRCD + fastv(budget=4)" and setting_label(alone) == "fastv(budget=4)"
    with pytest.raises(ValueError, match="cannot be combined"):
        build_generation_config(_preset_with_fastv(tiny_path.parent), FastV(budget=4), max_new_tokens=5)


def _preset_with_fastv(folder: Path) -> Path:
    path = folder / "with_fastv.yaml"
    RCPPGenerationConfig(methods=[FastV(budget=8)]).to_yaml(path)
    return path


def test_generate_with_a_method(tiny_path, tmp_path, capsys):
    preset = _write(tmp_path / "fastv.yaml", {"method": "fastv", "keep": 4})
    assert main(["generate", "--model", str(tiny_path), "--method-config", str(preset), "--max-new-tokens", "3",
                 "--compare"]) == 0
    out = capsys.readouterr().out
    assert "== original LLaVA" in out and "visual tokens kept all" in out
    # tiny: 4 layers, FastV's layer 2 of 32 -> 1; 4 of 16 visual tokens from there on
    assert "== fastv(keep=4)" in out and "prefill pruning before layer 1: 4/16 visual tokens kept" in out
    assert "visual tokens kept 4/16" in out


def test_eval_identity_records_the_method_and_refuses_another(varied_tiny_path, tmp_path, make_image_files):
    root = write_mme(tmp_path / "MME", make_image_files)
    run = tmp_path / "run"
    evaluate_mme(root, options(varied_tiny_path, run, method="fastv", method_config=str(_write(
        tmp_path / "k4.yaml", {"keep": 4}))), subtasks=("existence",))  # fmt: skip
    identity = json.loads((run / "config.json").read_text())["identity"]
    assert identity["method"] == {"method": "fastv", "budget": 128 / 576, "keep": 4, "layer": None, "query": "last"}
    assert identity["generation_config"]["methods"] == [identity["method"]] and len(read_jsonl(run / "answers.jsonl")) == 4
    with pytest.raises(ValueError, match="different generation_config, method"):
        evaluate_mme(root, options(varied_tiny_path, run, method="fastv", method_config=str(_write(
            tmp_path / "k2.yaml", {"keep": 2}))), subtasks=("existence",))  # fmt: skip
    with pytest.raises(ValueError, match="different generation_config, method"):
        evaluate_mme(root, options(varied_tiny_path, run), subtasks=("existence",))
    plain = tmp_path / "plain"
    evaluate_mme(root, options(varied_tiny_path, plain), subtasks=("existence",))
    assert "method" not in json.loads((plain / "config.json").read_text())["identity"]


def test_bench_runs_registry_methods_on_the_tiny_shape(tmp_path):
    preset = _write(tmp_path / "fastv.yaml", {"method": "fastv", "keep": 4})
    settings = BenchmarkSettings(shape="tiny", methods=("vanilla", "fastv", "fastv+rcpp"), new_tokens=5, repeats=1,
                                 early_steps=2, late_steps=2, method_presets=(read_method_yaml(preset),))  # fmt: skip
    report = run_speed_benchmark(settings)
    methods = report["methods"]
    entry = 4 * 2 * 16 * 2 * 4  # tiny: 4 layers x 2 kv heads x head_dim 16 x (key + value) x float32, per token
    prompt = report["environment"]["prompt_tokens"]
    # FastV before layer 1 of 4 keeps 4 of 16 visual tokens: layer 0 caches 16, layers 1-3 cache 4
    assert methods["fastv"]["method"]["keep"] == 4
    assert methods["fastv"]["final_visual_cache_bytes"] == entry // 4 * (16 + 3 * 4)
    assert methods["fastv"]["final_cache_bytes"] == entry * (prompt + 4) - entry // 4 * 3 * 12
    assert methods["fastv"]["cache_bytes_per_step"] == [methods["fastv"]["final_cache_bytes"] - entry * (4 - step)
                                                        for step in range(5)]  # fmt: skip
    assert methods["fastv+rcpp"]["final_visual_cache_bytes"] == methods["fastv"]["final_visual_cache_bytes"]
    text_tokens = prompt - 16
    assert methods["fastv"]["prefill_model_flops_ratio"] == pytest.approx(
        prefill_flops_ratio(load_benchmark_model("tiny", None, "cpu", torch.float32)[0], [PruneStage(1, 4)], 16, text_tokens)
    )
    assert methods["fastv"]["prefill_flops_ratio"] == pytest.approx(  # with its attention rows, counted
        methods["fastv"]["prefill_model_flops_ratio"] + methods["fastv"]["prefill_scoring_flops_ratio"])
    assert "prefill_flops_ratio" not in methods["vanilla"]
    # the budget path: the budget as given, a count or a fraction of the model's image (no scaling)
    assert method_generation_config("fastv", BenchmarkSettings(budget=5), 0.0).methods == (FastV(budget=5),)
    composed = method_generation_config("fastv+rcpp", BenchmarkSettings(budget=192 / 576), 0.0)
    assert composed.rcpp and composed.lambda_end == 0.5 and composed.methods == (FastV(budget=192 / 576),)


def test_prefill_flops_count_the_pruned_layers_by_hand():
    model = load_benchmark_model("tiny", None, "cpu", torch.float32)[0]
    layer = model.model.language_model.layers[0]
    per_token = sum(p.weight.numel() for p in (*[getattr(layer.self_attn, f"{n}_proj") for n in "qkvo"],
                                                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))  # fmt: skip
    width = model.config.text_config.num_attention_heads * model.config.text_config.head_dim
    text, visual, keep = 10, 16, 4
    full, pruned = text + visual, text + keep
    saved_per_layer = 2 * per_token * (full - pruned) + 2 * width * (full * full - pruned * pruned)
    # FastV before layer 1 of 4: layers 1, 2, 3 compute 12 tokens fewer
    assert prefill_flops(model, [], visual, text) - prefill_flops(model, [PruneStage(1, keep)], visual, text) == (
        3 * saved_per_layer
    )
    assert 0 < prefill_flops_ratio(model, [PruneStage(1, keep)], visual, text) < 1
