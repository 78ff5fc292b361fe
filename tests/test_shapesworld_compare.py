"""Comparing decoding settings: the rows from the registry, the table and the plot files."""

import json

import pytest

from rcpp_hf.cli import build_parser
from rcpp_hf.engine.pruning import PruneRecord
from rcpp_hf.methods import RCPP as RCPPMethod
from rcpp_hf.methods import METHODS, load_method
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld.compare import (
    RCPP,
    RCPP_PRESET,
    VANILLA,
    Setting,
    compare,
    comparison_settings,
    config_setting,
    model_shape,
)
from rcpp_hf.shapesworld.evaluate import prefill_visual_tokens


def test_compare_writes_the_table(shapesworld_small, tmp_path):
    configs = [VANILLA, str(RCPP_PRESET)]
    rows = compare(shapesworld_small, [config_setting(c) for c in configs], ["adversarial", "captions"], seed=1, num_images=1,
                   output_dir=tmp_path / "runs", progress=False)  # fmt: skip
    assert [r["setting"] for r in rows] == [VANILLA, "rcpp_default"]
    assert "visual_kept" not in json.dumps(rows[0]) and "captions.visual_kept" in rows[1]
    table = (tmp_path / "runs" / "table.md").read_text().split("\n\n")[0].splitlines()
    assert len(table) == 4 and table[0].startswith("| setting | budget | adv acc")
    assert (tmp_path / "runs" / "table.png").stat().st_size > 0


def test_each_row_gets_its_difference_to_the_reference_with_an_interval(shapesworld_small, tmp_path):
    # "greedy-copy" decodes as vanilla does: every difference is exactly 0, [0, 0]; fastv-64 cannot run on 16 tokens.
    settings = [config_setting(VANILLA), Setting("greedy-copy", VANILLA), config_setting(str(RCPP_PRESET)),
                *comparison_settings(["fastv"], (64,))]  # fmt: skip
    rows = compare(shapesworld_small, settings, ["adversarial", "captions"], seed=1, num_images=2,
                   output_dir=tmp_path, progress=False)  # fmt: skip
    rows = {row["setting"]: row for row in rows}
    keys = {"adversarial.accuracy", "adversarial.f1", "captions.chair_s", "captions.chair_i", "captions.recall"}
    questions = len((tmp_path / VANILLA / "adversarial" / "answers.jsonl").read_text().splitlines())
    for name in ("greedy-copy", "rcpp_default"):
        differences = rows[name]["differences"]
        assert (differences["reference"], differences["level"], differences["resamples"]) == (VANILLA, 0.95, 1000)
        assert set(differences["metrics"]) == keys
        for key, difference in differences["metrics"].items():
            assert difference["difference"] == pytest.approx(rows[name][key] - rows[VANILLA][key])
            assert difference["low"] <= difference["difference"] <= difference["high"]
            assert difference["n"] == (questions if key.startswith("adversarial") else 2)
    assert all((d["low"], d["high"]) == (0, 0) for d in rows["greedy-copy"]["differences"]["metrics"].values())
    assert "differences" not in rows[VANILLA] and "differences" not in rows["fastv-64"]
    assert json.loads((tmp_path / "table.json").read_text())[1]["differences"] == rows["greedy-copy"]["differences"]
    # Each row's own intervals for the frontier's error bars: greedy-copy's are vanilla's (the same answers).
    intervals = rows[VANILLA]["intervals"]
    assert (intervals["level"], intervals["resamples"], intervals["seed"]) == (0.95, 1000, 0)
    assert set(intervals["metrics"]) == {"adversarial.f1", "adversarial.yes_ratio", "captions.chair_i",
                                         "captions.recall"}  # fmt: skip
    for key, interval in intervals["metrics"].items():
        assert interval["value"] == pytest.approx(rows[VANILLA][key]) and interval["low"] <= interval["high"]
    assert rows["greedy-copy"]["intervals"] == intervals and "intervals" not in rows["fastv-64"]
    assert (tmp_path / "frontier.png").stat().st_size > 5_000

    main, differences = (tmp_path / "table.md").read_text().split("\n\n", 1)
    assert differences.startswith("Difference to vanilla (row - vanilla) on the paired items, 95% paired bootstrap "
                                  "interval (1000 resamples, seed 0")  # fmt: skip
    lines = differences.splitlines()
    assert lines[2] == "| setting | budget | adv acc | adv F1 | CHAIR_S | CHAIR_I | recall |"
    assert lines[4] == "| vanilla | - | " + " | ".join(["reference"] * 5) + " |"
    assert lines[5] == "| greedy-copy | - | " + " | ".join([f"+0.000 [+0.000, +0.000] n={questions}"] * 2
                                                          + ["+0.000 [+0.000, +0.000] n=2"] * 3) + " |"  # fmt: skip
    assert lines[7].startswith("| fastv-64 | 64 | - | - | - | - | - |")
    # Another reference: the differences are to it.
    rows = compare(shapesworld_small, settings[:3], ["captions"], seed=1, num_images=2, output_dir=tmp_path,
                   progress=False, reference="rcpp_default")  # fmt: skip
    assert rows[0]["differences"]["reference"] == "rcpp_default" and "differences" not in rows[2]
    assert set(rows[0]["differences"]["metrics"]) == {"captions.chair_s", "captions.chair_i", "captions.recall"}


def test_a_reference_that_is_no_row_is_refused_before_anything_runs(shapesworld_small, tmp_path, capsys):
    from rcpp_hf.cli import main

    status = main(["shapesworld", "compare", "--model", shapesworld_small, "--methods", "vanilla", "--reference",
                   "rcpp", "--splits", "random", "--num-images", "1", "--output-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.endswith("--reference 'rcpp' is not a row; the rows: vanilla")
    assert not any(tmp_path.iterdir())


def test_rows_come_from_the_registry_at_each_budget():
    settings = comparison_settings([VANILLA, RCPP, "fastv"], (64 / 576, 33), with_rcpp=True)
    # Rows are labelled by the budget as given: a fraction to 4 digits, a count as it is; the method gets it unchanged.
    assert [s.name for s in settings] == [VANILLA, RCPP, "fastv-0.1111", "fastv-33", "fastv+rcpp-0.1111",
                                          "fastv+rcpp-33"]  # fmt: skip
    assert [s.method["budget"] for s in settings[2:]] == [64 / 576, 33, 64 / 576, 33]
    # The rcpp row is the registry method at its defaults: the RCPP + DRCD that the "+rcpp" rows' preset composes.
    assert settings[1].config is None and settings[4].config == "rcpp_default"
    assert load_method(settings[1].method) == build_generation_config(settings[4].config).rcpp_method() == RCPPMethod()
    assert settings[2].config is None and settings[4].family == "fastv+rcpp"
    assert [s.name for s in comparison_settings([RCPP], (64,), with_rcpp=True)] == [RCPP]
    with pytest.raises(ValueError, match="unknown setting 'beam'; known: vanilla, .*fastv.*rcpp"):
        comparison_settings(["beam"], (64,))


def test_prefill_visual_tokens_average_over_layers():
    records = [PruneRecord(layer=1, kept=6, kept_visual_ids=None), PruneRecord(layer=3, kept=2, kept_visual_ids=None)]
    assert prefill_visual_tokens(records, num_layers=4, num_visual=16) == (16 + 6 + 6 + 2) / 4
    assert prefill_visual_tokens([], num_layers=4, num_visual=16) == 16


def test_compare_across_methods_and_budgets(shapesworld_small, tmp_path, capsys):
    assert model_shape(shapesworld_small) == (4, 16)
    args = build_parser().parse_args(["shapesworld", "compare", "--model", shapesworld_small, "--methods", "vanilla,fastv",
                                      "--budgets", "0.1111", "0.3333", "--splits", "random", "captions", "--seed", "1",
                                      "--num-images", "1", "--batch-size", "4", "--output-dir", str(tmp_path)])
    assert args.func(args) == 0
    rows = {row["setting"]: row for row in json.loads((tmp_path / "table.json").read_text())}
    assert list(rows) == [VANILLA, "fastv-0.1111", "fastv-0.3333"]
    # 0.1111 of 16 tokens -> 2: below the 4 that layer 0 alone averages before FastV prunes at layer 1 of 4
    assert rows["fastv-0.1111"]["skipped"].endswith("is unreachable: pruning before layer 1 of 4 averages at least 4; "
                                                    "reachable: 5..16")  # fmt: skip
    assert not (tmp_path / "fastv-0.1111").exists()
    # 0.3333 of 16 -> budget 5; keep R = round((5 * 4 - 16) / 3) = 1 from layer 1: (16 + 3 * 1) / 4 = 4.75
    assert rows["fastv-0.3333"]["method"] == {"method": "fastv", "budget": 0.3333, "keep": None, "layer": None,
                                              "query": "last"}  # fmt: skip
    assert rows["fastv-0.3333"]["budget_tokens"] == 5
    assert rows["fastv-0.3333"]["visual_tokens"] == 4.75 and rows[VANILLA]["visual_tokens"] == 16
    for row in (rows[VANILLA], rows["fastv-0.3333"]):
        assert {"random.f1", "captions.chair_i", "captions.recall"} <= set(row)
        assert row["prefill_ms"] > 0 and row["decode_ms"] > 0
    run = json.loads((tmp_path / "fastv-0.3333" / "captions" / "config.json").read_text())["identity"]
    assert run["settings"]["method"]["budget"] == 0.3333 and run["generation_config"]["methods"][0]["method"] == "fastv"
    assert "method" not in json.loads((tmp_path / VANILLA / "captions" / "config.json").read_text())["identity"]["settings"]
    table = (tmp_path / "table.md").read_text()
    assert "| fastv-0.1111 | 0.1111 = 2 of 16 | skipped: FastV.budget = 0.1111: budget 0.1111 (2 of 16" in table
    assert "| fastv-0.3333 | 0.3333 = 5 of 16 |" in table
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert (tmp_path / "frontier.png").stat().st_size > 5_000  # CHAIR_I against recall (no adversarial split here)
    captions = rows["fastv-0.3333"]["intervals"]["metrics"]
    assert set(captions) == {"captions.chair_i", "captions.recall"} and captions["captions.recall"]["n"] == 1
    assert "intervals" not in rows["fastv-0.1111"]
    assert "fastv-0.3333" in capsys.readouterr().out


def test_a_comparison_with_nothing_to_run_says_so_and_exits_2(shapesworld_small, tmp_path, capsys):
    from rcpp_hf.cli import main

    status = main(["shapesworld", "compare", "--model", shapesworld_small, "--methods", "fastv", "--budgets", "64",
                   "--splits", "random", "--num-images", "1", "--output-dir", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("rcpp-hf shapesworld compare: error: nothing to compare on this model: fastv-64: ")


def test_head_ablation_rows_table_and_heat_map(shapesworld_small, tmp_path, capsys):
    from experiments.head_ablation import ablation_settings, main, scale_heads, study_heads

    assert [scale_heads(h, 8) for h in (8, 16, 24, 32)] == [2, 4, 6, 8] and study_heads(4) == (1, 2, 3, 4)
    # --heads are this model's own head counts (here 1 and 4 of 4), budgets as given
    settings = ablation_settings(["sum", "gini", "consensus_diversity"], (1, 4), (64 / 576, 5), 4)
    names = [s.name for s in settings]
    assert names[:5] == ["fastv-0.1111", "fp-sum-h1-0.1111", "fp-sum-h4-0.1111", "fp-gini-h1-0.1111",
                         "fp-gini-h4-0.1111"]  # fmt: skip
    assert names[5] == "fp-consensus_diversity-0.1111" and names[6] == "fastv-5" and len(names) == 12
    with pytest.raises(ValueError, match=r"head counts of this model must lie in \[1, 4\]"):
        ablation_settings(["sum"], (8,), (5,), 4)

    assert main(["--model", shapesworld_small, "--strategies", "sum", "consensus_diversity", "--heads", "1", "4",
                 "--budgets", "0.3333", "--num-images", "1", "--output-dir", str(tmp_path)]) == 0  # fmt: skip
    table = (tmp_path / "ablation.md").read_text()
    assert "budget 0.3333 — POPE" in table and "| sum |" in table and "fastv (all heads)" in table
    cells = json.loads((tmp_path / "ablation.json").read_text())
    assert {(c["strategy"], c["heads"]) for c in cells} == {
        ("fastv (all heads)", "all"), ("sum", 1), ("sum", 4), ("consensus_diversity", "dyn")
    }
    dynamic = next(c for c in cells if c["heads"] == "dyn")
    assert 1 <= dynamic["heads_chosen"] <= 4
    assert (tmp_path / "ablation.png").stat().st_size > 0


def test_compare_rows_for_the_contrastive_peers(shapesworld_small, tmp_path):
    settings = comparison_settings([VANILLA, "vcd", "sid", "plausibility_cutoff"], (64,), with_rcpp=True)
    assert [s.name for s in settings] == [VANILLA, "vcd", "vcd+rcpp", "sid", "sid+rcpp", "plausibility_cutoff",
                                          "plausibility_cutoff+rcpp"]  # fmt: skip
    rows = compare(shapesworld_small, settings[:4], ["random", "captions"], seed=1, num_images=1,
                   output_dir=tmp_path, batch_size=4, progress=False)  # fmt: skip
    rows = {row["setting"]: row for row in rows}
    assert "does not compose with RCPP" in rows["vcd+rcpp"]["skipped"]
    for name in (VANILLA, "vcd", "sid"):
        assert {"random.f1", "random.yes_ratio", "captions.chair_i", "captions.recall"} <= set(rows[name]), name
    assert rows["vcd"]["method"]["method"] == "vcd" and rows["sid"]["method"]["alpha"] == 0.5


def test_method_presets_are_rows_and_methods_needing_training_are_not_default_rows():

    from rcpp_hf.shapesworld.compare import runs_with_defaults

    row = config_setting("himap_fps")  # a shipped method preset, by name
    assert (row.name, row.family, row.config) == ("himap_fps", "himap", None)
    assert config_setting("rcpp_evict") == Setting("rcpp_evict", RCPP, config="rcpp_evict")
    assert row.method["use_token_condensation"] is True
    assert runs_with_defaults("fastv") and not runs_with_defaults("gan_pruner")  # needs its trained pruner_path


def test_every_row_of_the_default_comparison_runs_on_the_embedded_model():
    """The default comparison's budgets (64 / 128 / 192 of 576 as fractions) are reachable for every method on the
    embedded 12-layer model: no row is skipped but the contrastive decoders composed with RCPP + DRCD."""
    from rcpp_hf.default_model import default_model_path
    from rcpp_hf.shapesworld.compare import BUDGETS, comparison_settings, model_shape, runs_with_defaults, skip_reason

    num_layers, num_visual = model_shape(str(default_model_path()))
    assert (num_layers, num_visual) == (12, 100)
    names = ["vanilla", "rcpp", *(name for name in METHODS if name != "rcpp" and runs_with_defaults(name))]
    skipped = {setting.name: skip_reason(setting, num_layers, num_visual)
               for setting in comparison_settings(names, BUDGETS, with_rcpp=True)}  # fmt: skip
    skipped = {name: reason for name, reason in skipped.items() if reason is not None}
    assert all("contrastive decoder" in reason for reason in skipped.values()), skipped
    assert len(names) == 18 and not {"fastv-0.1111", "pdrop+rcpp-0.1111", "sparsevlm-0.1111"} & set(skipped)
