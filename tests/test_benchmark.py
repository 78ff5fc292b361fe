"""The benchmark suite on the tiny shape: fields, ratios from the measured values, cache bytes from the tensors.
No test asserts a time."""

import json

import pytest

from rcpp_hf.benchmark.suite import (
    DEFAULT_METHODS,
    RATIO_METRICS,
    BenchmarkSettings,
    format_report,
    method_generation_config,
    plot_report,
    run_speed_benchmark,
)
from rcpp_hf.cli import main


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
