"""The token-condensation experiment (`experiments/condensation.py`) end to end on a small ShapesWorld model, and
HiMAP's rows in compare and bench."""

import json

from experiments.condensation import (
    cell_records,
    default_layers,
    experiment_settings,
    main,
)
from rcpp_hf.benchmark.suite import known_methods
from rcpp_hf.shapesworld.compare import VANILLA, comparison_settings
from tests.test_shapesworld_evaluate import small_model  # noqa: F401 (fixture)


def test_cells_and_gains():
    settings = experiment_settings((64 / 576, 3), (1, 2))
    assert [s.name for s in settings[:4]] == [VANILLA, "hard-t0.1111-l1", "fps-t0.1111-l1", "connectivity-t0.1111-l1"]
    assert settings[7].name == "hard-t3-l1" and len(settings) == 1 + 2 * 2 * 3
    assert settings[2].method["txt_rank"] == 64 / 576 and settings[2].method["condensation_strategy"] == "fps"
    assert not settings[1].method["use_token_condensation"] and not settings[1].method["image_stage"]
    assert default_layers(32) == (5, 10, 15) and default_layers(12) == (2, 4, 6)
    rows = [{"setting": s.name, "family": s.family, "budget": s.budget, "budget_tokens": 2, "method": s.method}
            for s in settings[:4]]  # fmt: skip
    for row, score in zip(rows, (700, 500, 540, 480)):
        row.update({"mme.score": score, "adversarial.f1": score / 1000})
    records = cell_records(rows, "adversarial")
    assert [r.get("mme_score_gain") for r in records] == [None, 0, 40, -20]
    assert abs(records[2]["pope_f1_gain"] - 0.04) < 1e-9 and records[2]["layer"] == 1 and records[2]["tokens"] == 2


def test_experiment_runs_end_to_end(small_model, tmp_path, capsys):  # noqa: F811
    args = ["--model", small_model, "--target-tokens", "0.3333", "--layers", "1", "2", "--pope-split", "random",
            "--seed", "1", "--num-images", "2", "--batch-size", "4", "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    records = {r["setting"]: r for r in json.loads((tmp_path / "condensation.json").read_text())}
    assert list(records) == [VANILLA] + [f"{v}-t0.3333-l{l}" for l in (1, 2) for v in ("hard", "fps", "connectivity")]
    for record in records.values():
        assert {"existence_acc", "count_acc", "position_acc", "color_acc", "mme_score", "pope_f1"} <= set(record)
    assert records["fps-t0.3333-l2"]["tokens"] == 5 and "mme_score_gain" in records["fps-t0.3333-l2"]
    assert records["hard-t0.3333-l1"]["mme_score_gain"] == 0
    # each cell's answers are appended as they come; a rerun resumes (nothing left to ask) and writes the same table
    lines = (tmp_path / "fps-t0.3333-l1" / "mme" / "answers.part-0.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 4 * 2  # 2 images x 4 subtasks x a yes and a no question
    table = (tmp_path / "condensation.md").read_text()
    assert main(args) == 0 and (tmp_path / "condensation.md").read_text() == table
    assert (tmp_path / "condensation.png").stat().st_size > 10_000
    run = json.loads((tmp_path / "connectivity-t0.3333-l2" / "random" / "config.json").read_text())["identity"]
    assert run["settings"]["method"]["condensation_strategy"] == "connectivity"
    assert "connectivity" in capsys.readouterr().out


def test_compare_and_bench_pick_himap_up():
    (setting,) = comparison_settings(["himap"], (64, 128))
    assert setting.name == "himap" and setting.method["method"] == "himap"
    assert {"himap", "himap+rcpp"} <= set(known_methods())
