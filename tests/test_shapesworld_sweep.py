"""The defaults sweep (`experiments/defaults_sweep.py`): the choice rule on hand-made rows, the grid, round 2's
construction, and a run end to end."""

import json

import pytest

from experiments import defaults_sweep as sweep_module
from experiments.defaults_sweep import (
    CENTRE,
    FIRST_ROUND,
    choose,
    rank,
    second_round,
    sweep,
    variation_name,
    write_presets,
)
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.shapesworld.compare import VANILLA


def row(name, chair_i, recall, f1=0.90):
    return {"setting": name, "captions.chair_i": chair_i, "captions.recall": recall, "adversarial.f1": f1}


GREEDY = row(VANILLA, 0.30, 0.60, 0.90)


def test_rule_takes_the_lowest_chair_i_that_keeps_recall_and_pope_f1():
    rows = [GREEDY,
            row("recall lost", 0.10, 0.579),  # below 0.60 - 0.02
            row("f1 lost", 0.12, 0.70, f1=0.899),
            row("worse than greedy", 0.35, 0.65),  # qualifies, but a higher CHAIR_I
            row("on the bound", 0.20, 0.58),  # recall exactly greedy's - 0.02 qualifies
            row("higher f1", 0.25, 0.62, f1=0.95)]  # fmt: skip
    assert choose(rows)["setting"] == "on the bound"
    assert [r["setting"] for r in rank(rows)][:3] == ["on the bound", "higher f1", "worse than greedy"]


def test_rule_keeps_greedy_when_no_rcpp_setting_qualifies():
    rows = [row("a", 0.10, 0.50), GREEDY, row("b", 0.20, 0.70, f1=0.85), row("c", 0.05, 0.40, f1=0.99)]
    assert choose(rows) is rows[1]
    # greedy itself never competes, even with the lowest CHAIR_I of all
    assert choose([row(VANILLA, 0.01, 0.60), row("d", 0.20, 0.60)])["setting"] == "d"


def test_rule_breaks_a_chair_i_tie_by_recall_then_by_order():
    rows = [GREEDY, row("low recall", 0.20, 0.59), row("high recall", 0.20, 0.64), row("same", 0.20, 0.64)]
    assert choose(rows)["setting"] == "high recall"


def test_first_round_moves_every_knob_and_every_setting_validates(tmp_path):
    changed = [(key, value) for changes in FIRST_ROUND for key, value in changes.items()]
    assert {value for key, value in changed if key == "tau_mode"} | {"absolute"} == {"absolute", "quantile", "std"}
    assert sum(1 for changes in FIRST_ROUND if set(changes) == {"tau"}) >= 2  # absolute tau, several values
    for knob in ("gamma", "lambda_end", "keep_ratio_end", "schedule_steps", "plausibility_beta"):
        assert sum(key == knob for key, _ in changed) >= 2, knob
    assert ("schedule", "step") in changed and ("first_token_action", True) in changed
    paths = write_presets(tmp_path, [{}, *FIRST_ROUND])
    assert len(set(paths)) == len(FIRST_ROUND) + 1 and paths[0].endswith("default.yaml")
    for path, changes in zip(paths, [{}, *FIRST_ROUND]):
        config = RCPPGenerationConfig.from_yaml(path)
        differing = {key for key in CENTRE if getattr(config, key) != CENTRE[key]}
        assert differing == set(changes), path
        assert config.do_sample is False


def test_second_round_combines_the_three_most_promising_variations_with_disjoint_fields():
    variations = [{"tau": 0.05}, {"tau_mode": "quantile", "tau": 0.1}, {"gamma": 0.8}, {"lambda_end": 0.25},
                  {"keep_ratio_end": 1.0}, {"schedule": "step"}]  # fmt: skip
    rows = [GREEDY,
            row("tau=0.05", 0.20, 0.59),  # qualifies: first
            row("tau_mode=quantile,tau=0.1", 0.15, 0.60),  # qualifies with a lower CHAIR_I, changes tau too
            row("gamma=0.8", 0.25, 0.50),  # misses recall by 0.08
            row("lambda_end=0.25", 0.29, 0.57),  # misses recall by 0.01
            row("keep_ratio_end=1.0", 0.31, 0.70),  # qualifies but a CHAIR_I above greedy's: not promising
            row("schedule=step", 0.28, 0.60, f1=0.87)]  # misses F1 by 0.03  # fmt: skip
    combos = second_round(rows, variations)
    picked = [{"tau_mode": "quantile", "tau": 0.1}, {"lambda_end": 0.25}, {"schedule": "step"}]
    assert combos == [picked[0] | picked[1], picked[0] | picked[2], picked[1] | picked[2],
                      picked[0] | picked[1] | picked[2]]  # fmt: skip
    assert variation_name(combos[0]) == "tau_mode=quantile,tau=0.1,lambda_end=0.25"
    assert second_round([GREEDY, row("gamma=0.8", 0.25, 0.60)], variations) == []  # one pick: nothing to combine


def test_sweep_writes_its_rule_before_any_row_and_resumes(shapesworld_small, tmp_path, monkeypatch, capsys):
    variations = [{"tau_mode": "quantile", "tau": 0.5}, {"first_token_action": True}]
    monkeypatch.setattr(sweep_module, "FIRST_ROUND", variations)
    compare = sweep_module.compare
    calls = []

    def compare_after_the_rule(model, settings, *args, **kwargs):
        assert "lowest captions CHAIR_I" in (tmp_path / "RULE.md").read_text()
        calls.append([setting.name for setting in settings])
        return compare(model, settings, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "compare", compare_after_the_rule)
    args = ["--model", shapesworld_small, "--seed", "1", "--num-images", "1", "--batch-size", "8",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert sweep(shapesworld_small, 1, 1, tmp_path, batch_size=8, variations=variations, progress=False)
    assert calls[0] == [VANILLA, "default", *map(variation_name, variations)]
    choice = json.loads((tmp_path / "choice.json").read_text())
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [r["setting"] for r in rows] == calls[1] and choice["second_round"] == calls[1][len(calls[0]) :]
    for r in rows:
        assert {"adversarial.f1", "adversarial.yes_ratio", "captions.chair_i", "captions.recall"} <= set(r)
    assert choice["setting"] == choose(rows)["setting"]
    ranking = (tmp_path / "ranking.md").read_text().splitlines()
    assert ranking[0].endswith("| CHAIR_I - greedy | recall - greedy | adv F1 - greedy |")
    assert ranking[2].startswith(f"| {VANILLA} | (greedy) |") and ranking[2].endswith("| - | - | - |")
    questions = len((tmp_path / VANILLA / "adversarial" / "answers.jsonl").read_text().splitlines())
    for line in ranking[3:]:  # every RCPP row: its differences to greedy, with their intervals and n (1 caption)
        assert line.count(" [") == 3 and line.count(" n=1 | ") == 2 and line.endswith(f" n={questions} |"), line
    assert set(choice["row"].get("differences", {"metrics": {}})["metrics"]) <= {
        "adversarial.accuracy", "adversarial.f1", "captions.chair_s", "captions.chair_i", "captions.recall"}
    assert (tmp_path / "frontier.png").stat().st_size > 5_000

    def no_model(*args, **kwargs):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr("rcpp_hf.shapesworld.evaluate.RCPPLlavaForConditionalGeneration.from_pretrained", no_model)
    assert sweep_module.main(args) == 0  # the script, same grid: every row resumes
    assert f"chosen: {choice['setting']}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="states another rule or grid"):
        sweep(shapesworld_small, 1, 2, tmp_path, variations=variations, progress=False)
