"""The benchmark suite on the tiny shape: fields, ratios from the measured values, cache bytes from the tensors.
No test asserts a time."""

import argparse
import functools
import json
import time

import pytest
import torch

from rcpp_hf.auto import model_shape
from rcpp_hf.benchmark import gpu_run, prefill_plot, prefill_profile
from rcpp_hf.benchmark.flops import prefill_flops, weight_macs
from rcpp_hf.benchmark.measure import StepTimer
from rcpp_hf.benchmark.model_sizes import SHAPES, load_benchmark_model
from rcpp_hf.benchmark.suite import (
    DEFAULT_METHODS,
    RATIO_METRICS,
    BenchmarkSettings,
    benchmark_inputs,
    format_report,
    image_side,
    method_generation_config,
    plot_report,
    run_method,
    run_speed_benchmark,
)
from rcpp_hf.cli import main
from rcpp_hf.cli.bench import add_parser


@pytest.fixture(scope="module")
def report():
    return run_speed_benchmark(BenchmarkSettings(shape="tiny", new_tokens=8, repeats=1, evict_steps=4, early_steps=2,
                                           late_steps=3))


def test_report_fields_and_ratios(report):
    assert set(report["methods"]) == set(DEFAULT_METHODS)
    vanilla = report["methods"]["vanilla"]
    for name, metrics in report["methods"].items():
        assert len(metrics["decode_s_per_step"]) == 7  # tokens 2..8; token 1 comes from the prefill
        assert len(metrics["cache_bytes_per_step"]) == len(metrics["visual_cache_bytes_per_step"]) == 8
        assert metrics["prefill_s"] > 0 and metrics["tokens_per_s"] > 0
        for ratio, metric in RATIO_METRICS.items():
            assert metrics[ratio] == pytest.approx(metrics[metric] / vanilla[metric]), (name, ratio)
    assert {check["method"] for check in report["targets"]} == set(DEFAULT_METHODS) - {"vanilla"}
    json.dumps(report)  # JSON-ready


def test_cache_bytes_follow_the_cache_tensors(report):
    methods = report["methods"]
    visual = report["environment"]["visual_tokens"]
    prompt = report["environment"]["prompt_tokens"]
    # tiny: 4 layers x 2 kv heads x head_dim 16 x (key + value) x float32 = 1024 bytes per cached token
    entry = 4 * 2 * 16 * 2 * 4
    assert methods["vanilla"]["cache_bytes_per_step"] == [entry * (prompt + step) for step in range(8)]
    assert methods["vanilla"]["final_visual_cache_bytes"] == entry * visual
    assert methods["rcpp-score-only"]["cache_bytes_per_step"] == methods["vanilla"]["cache_bytes_per_step"]
    # eviction to a quarter of 16 visual tokens by step 4
    assert methods["rcpp-evict"]["final_visual_cache_bytes"] == entry * 4
    assert methods["rcpp-evict"]["final_visual_cache_ratio"] == pytest.approx(0.25)
    assert methods["rcpp-evict"]["final_cache_bytes"] == entry * (prompt + 7 - 12)
    assert methods["rcpp"]["contrast_step_fraction"] > 0
    # VCD, the two-pass reference: two full caches, a contrast forward at every step
    assert methods["vcd"]["cache_bytes_per_step"] == [2 * b for b in methods["vanilla"]["cache_bytes_per_step"]]
    assert methods["vcd"]["final_visual_cache_bytes"] == 2 * entry * visual
    assert methods["vcd"]["contrast_step_fraction"] == 1.0


def test_report_table_and_plot(report, tmp_path):
    text = format_report(report)
    assert "rcpp-evict" in text and "target" in text and "x)" in text
    plot_report(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_rcpp_first_is_rcpp_with_the_first_token_action(report):
    first, plain = (method_generation_config(m, BenchmarkSettings(), tau=0.1).to_dict() for m in ("rcpp-first", "rcpp"))
    assert first.pop("first_token_action") and not plain.pop("first_token_action")
    assert first == plain
    # Same cache: the action replaces the last prompt token's entry, it adds none.
    methods = report["methods"]
    assert methods["rcpp-first"]["cache_bytes_per_step"] == methods["rcpp"]["cache_bytes_per_step"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="methods"):
        BenchmarkSettings(methods=("vanilla", "beam"))
    with pytest.raises(ValueError, match="vanilla"):
        BenchmarkSettings(methods=("rcpp",))
    with pytest.raises(ValueError, match="new_tokens"):
        BenchmarkSettings(new_tokens=1)
    with pytest.raises(ValueError, match="no generation config"):
        method_generation_config("two-pass", BenchmarkSettings(), tau=0.0)


def test_cli_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny", "--methods", "vanilla,rcpp", "--new-tokens", "5", "--repeats", "1",
                 "--output", str(output)]) == 0
    assert set(json.loads(output.read_text())["methods"]) == {"vanilla", "rcpp"}
    assert "decode ms" in capsys.readouterr().out


def test_7b_shape_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        run_speed_benchmark(BenchmarkSettings(shape="7b", device="cpu", dtype="float16"))


def test_prefill_is_timed_from_the_call_so_it_covers_the_image_encoding():
    """`generate` encodes the images before its streamer sees the prompt, except for methods that encode them in the
    decoding loop (vision-side pruners, VCD): timed from the call, every row's prefill holds the vision tower."""
    settings = BenchmarkSettings(shape="tiny", methods=("vanilla", "visionzip"), new_tokens=4, budget=8)
    model, processor = load_benchmark_model("tiny", None, "cpu", torch.float32)
    inputs = benchmark_inputs(processor, settings, "cpu", torch.float32)
    encode = model.model.get_image_features
    encoded_at = []

    @functools.wraps(encode)  # generate reads its signature
    def timed_encode(*args, **kwargs):
        encoded_at.append(time.perf_counter())
        return encode(*args, **kwargs)

    model.model.get_image_features = timed_encode
    for method in ("vanilla", "visionzip"):
        timer, encoded_at[:] = StepTimer(), []
        run_method(model, inputs, method, settings, tau=0.5, streamer=timer)
        assert len(encoded_at) == 1 and timer.started < encoded_at[0] < timer.stamps[1], method
        assert timer.prefill_seconds == timer.stamps[1] - timer.started
    assert encoded_at[0] > timer.stamps[0]  # visionzip encodes after the prompt's put: that put cannot start the clock


@pytest.fixture(scope="module")
def pruner_report():
    return run_speed_benchmark(BenchmarkSettings(shape="tiny", methods=("vanilla", "pdrop", "random", "visionzip"),
                                                 budget=12, new_tokens=5, repeats=1, early_steps=2, late_steps=2))


def test_prefill_flops_count_each_pruners_own_work(pruner_report):
    methods = pruner_report["methods"]
    for name in ("pdrop", "random", "visionzip"):
        metrics = methods[name]
        assert metrics["prefill_flops_ratio"] == pytest.approx(
            metrics["prefill_model_flops_ratio"] + metrics["prefill_scoring_flops_ratio"])
        assert metrics["prefill_over_flops"] == pytest.approx(metrics["prefill_ratio"] / metrics["prefill_flops_ratio"])
        # the weight reads cost every row alike, so they pull the cost ratio from the FLOPs ratio towards 1
        assert metrics["prefill_flops_ratio"] < metrics["prefill_cost_ratio"] < 1
    assert methods["random"]["prefill_scoring_flops_ratio"] == 0  # a random choice computes nothing
    assert methods["pdrop"]["prefill_scoring_flops_ratio"] > 0  # a layer's keys recomputed for every entry
    assert methods["visionzip"]["prefill_scoring_flops_ratio"] > 0  # the vision tower's attention, merged tokens
    checks = {(check["method"], check["metric"]) for check in pruner_report["targets"]}
    assert {(name, metric) for name in ("pdrop", "random", "visionzip")
            for metric in ("prefill_over_flops", "decode_median_ratio")} <= checks  # fmt: skip
    assert "prefill FLOPs (scoring)" in format_report(pruner_report)
    assert pruner_report["environment"]["flops_per_weight_byte"] > 0


def test_peak_above_the_loaded_model(pruner_report):
    for metrics in pruner_report["methods"].values():
        assert 0 < metrics["peak_above_model_bytes"] < metrics["peak_memory_bytes"]
    assert "peak - model MiB" in format_report(pruner_report)


def test_7b_width_shape_is_offered():
    spec = SHAPES["7b-width"]
    assert (spec.text_hidden, spec.num_heads, spec.num_kv_heads, spec.text_intermediate) == (4096, 32, 32, 11008)
    assert (spec.vision_hidden, spec.vision_layers, spec.image_size, spec.patch_size) == (1024, 24, 336, 14)
    assert spec.model_vocab_size == SHAPES["7b"].model_vocab_size and spec.text_layers < SHAPES["7b"].text_layers
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert "7b-width" in parser._subparsers._group_actions[0].choices["bench"].format_help()


def test_llava_next_shape_runs_with_a_vision_side_pruner_skipped():
    """The tests' LLaVA-NeXT through the benchmark: the image is the largest square grid (a base tile and 2 x 2
    tiles, 88 visual tokens), FastV runs on it, VisionZip is a skipped row with the family's refusal."""
    report = run_speed_benchmark(BenchmarkSettings(shape="next-tiny", methods=("vanilla", "fastv", "visionzip"),
                                                   budget=0.5, new_tokens=5, repeats=1, early_steps=2, late_steps=2))
    assert report["environment"]["visual_tokens"] == 88
    methods = report["methods"]
    assert "reads the vision tower" in methods["visionzip"]["skipped"]
    assert "visionzip: skipped: visionzip reads the vision tower" in format_report(report)
    # the tiny NeXT decoder: 4 layers x 2 kv heads x head_dim 16 x (key + value) x float32 = 1024 bytes per token
    assert methods["vanilla"]["final_visual_cache_bytes"] == 1024 * 88
    fastv = methods["fastv"]
    assert fastv["final_visual_cache_bytes"] < methods["vanilla"]["final_visual_cache_bytes"]
    assert 0 < fastv["prefill_model_flops_ratio"] < 1 and fastv["prefill_flops_ratio"] < fastv["prefill_cost_ratio"]


def test_prefill_flops_count_every_tile_of_an_anyres_image():
    """The vision tower computes each tile's patches and CLS, the projector each tile's patches; the newline tokens
    only the decoder (they are among `num_visual`)."""
    model, _ = load_benchmark_model("next-tiny", None, "cpu", torch.float32)
    one, five = prefill_flops(model, [], 88, 20, tiles=1), prefill_flops(model, [], 88, 20, tiles=5)
    tower, projector = weight_macs(model.model.vision_tower), weight_macs(model.model.multi_modal_projector)
    assert five - one == 2 * (tower * 4 * 17 + projector * 4 * 16)


def test_llava_next_shapes_have_the_anyres_token_count():
    """next-small: llava-v1.6's layout at small widths; its 672 x 672 image gives 576 + 48 x 48 + 48 = 2,928 visual
    tokens in five tiles, as next-7b's (llava-v1.6-vicuna-7b, CUDA only)."""
    model, processor = load_benchmark_model("next-small", None, "cpu", torch.float32)
    assert image_side(model.config) == 672
    inputs = benchmark_inputs(processor, BenchmarkSettings(), "cpu", torch.float32, image_side(model.config))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2928
    assert inputs["pixel_values"].shape[:2] == (1, 5)
    assert model_shape(model.config) == (8, 2928)
    spec = SHAPES["next-7b"]
    assert (spec.text_hidden, spec.text_layers, spec.num_heads, spec.text_intermediate) == (4096, 32, 32, 11008)
    assert (spec.vision_hidden, spec.vision_layers, spec.tile_size, spec.patch_size) == (1024, 24, 336, 14)
    assert spec.pinpoints == SHAPES["next-small"].pinpoints
    with pytest.raises(ValueError, match="CUDA.*--shape next-small"):
        load_benchmark_model("next-7b", None, "cpu", torch.float16)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert "next-small" in help_text and "next-7b" in help_text


def test_qwen_shape_runs_with_a_vision_side_pruner_and_vcd_skipped():
    """The tests' Qwen2.5-VL through the benchmark: the 192 x 192 image is resized to its 48 x 48 pixel cap, 36
    visual tokens; FastV runs on it, VisionZip and VCD are skipped rows with their refusals."""
    report = run_speed_benchmark(BenchmarkSettings(shape="qwen-tiny", methods=("vanilla", "fastv", "visionzip", "vcd"),
                                                   budget=0.5, new_tokens=5, repeats=1, early_steps=2, late_steps=2))
    assert report["environment"]["visual_tokens"] == 36
    methods = report["methods"]
    assert "reads the vision tower" in methods["visionzip"]["skipped"]
    assert "flattened patches" in methods["vcd"]["skipped"]
    assert "vcd: skipped: vcd adds one noise image" in format_report(report)
    # the tiny Qwen decoder: 4 layers x 2 kv heads x head_dim 16 x (key + value) x float32 = 1024 bytes per token
    assert methods["vanilla"]["final_visual_cache_bytes"] == 1024 * 36
    fastv = methods["fastv"]
    assert fastv["final_visual_cache_bytes"] == 1024 * 18  # half the image's tokens from FastV's layer on
    assert 0 < fastv["prefill_model_flops_ratio"] < 1 and fastv["prefill_flops_ratio"] < fastv["prefill_cost_ratio"]


def test_qwen_shapes_have_the_token_count_of_a_672_pixel_image():
    """qwen-small: Qwen2.5-VL's processor at small widths; its 672 x 672 image is 24 x 24 = 576 merged tokens, as
    qwen-7b's (Qwen2.5-VL-7B's config, CUDA only)."""
    model, processor = load_benchmark_model("qwen-small", None, "cpu", torch.float32)
    assert image_side(model.config) == 672
    inputs = benchmark_inputs(processor, BenchmarkSettings(), "cpu", torch.float32, image_side(model.config))
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    assert inputs["image_grid_thw"].tolist() == [[1, 48, 48]]
    assert model.config.text_config.num_hidden_layers == 8
    spec = SHAPES["qwen-7b"]
    assert (spec.text_hidden, spec.text_layers, spec.num_heads, spec.num_kv_heads, spec.text_intermediate) == (
        3584, 28, 28, 4, 18944)
    assert (spec.vision_hidden, spec.vision_layers, spec.vision_intermediate, spec.fullatt_block_indexes) == (
        1280, 32, 3420, (7, 15, 23, 31))
    assert spec.max_pixels == SHAPES["qwen-small"].max_pixels == 12845056
    with pytest.raises(ValueError, match="CUDA.*--shape qwen-small"):
        load_benchmark_model("qwen-7b", None, "cpu", torch.float16)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    help_text = parser._subparsers._group_actions[0].choices["bench"].format_help()
    assert all(shape in help_text for shape in ("qwen-tiny", "qwen-small", "qwen-7b"))


def test_gpu_command_runs_on_a_cpu_with_the_tiny_shape(tmp_path, capsys):
    assert gpu_run.main(["--output-dir", str(tmp_path), "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                         "--new-tokens", "4", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "gpu-bench.json").read_text())
    first, second = result["runs"]
    assert set(first["methods"]) == {"vanilla", *gpu_run.DECODING_ROWS, *gpu_run.prefill_pruners()}
    assert set(second["methods"]) == {"vanilla", *gpu_run.prefill_pruners()}
    assert [run["settings"]["budget"] for run in result["runs"]] == list(gpu_run.BUDGETS)
    assert first["methods"]["vcd"]["peak_memory_bytes"] > 0
    assert (tmp_path / "gpu-bench.png").stat().st_size > 10_000


def test_prefill_plot_from_reports(pruner_report, tmp_path):
    report_path = tmp_path / "bench.json"
    report_path.write_text(json.dumps(pruner_report))
    assert prefill_plot.main([str(report_path), str(report_path), "--output", str(tmp_path / "prefill.png")]) == 0
    assert (tmp_path / "prefill.png").stat().st_size > 10_000


def test_prefill_profile_accounts_for_the_whole_call(capsys):
    settings = BenchmarkSettings(shape="tiny", methods=("vanilla", "pdrop", "visionzip"), budget=12, repeats=1)
    model, processor = load_benchmark_model("tiny", None, "cpu", torch.float32)
    profile = prefill_profile.profile_prefill(model, processor, settings)
    for method, stages in profile.items():
        assert stages["rest"] > 0 and stages["decoder layers"] > 0 and stages["vision tower"] > 0, method
        assert sum(stages[s] for s in (*prefill_profile.STAGES, "rest")) == pytest.approx(stages["prefill"])
    assert profile["vanilla"]["pruning stages"] == 0 < profile["pdrop"]["pruning stages"]
    assert prefill_profile.main(["--shape", "tiny", "--methods", "vanilla,fastv", "--budget", "8", "--repeats", "1",
                                 "--rows", "4", "16"]) == 0  # fmt: skip
    assert "GFLOP/s" in capsys.readouterr().out
