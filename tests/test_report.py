"""`rcpp-hf report`: one finished run of each kind the evaluation writes (eval pope / chair / mme on the tiny
fixtures, eval shapesworld on a small random ShapesWorld model), each labelled by the decoding its config.json
recorded, with its headline metrics."""

import json

import pytest

from rcpp_hf.cli import main
from rcpp_hf.eval.chair import evaluate_chair
from rcpp_hf.eval.mme import evaluate_mme
from rcpp_hf.eval.pope import evaluate_pope
from rcpp_hf.eval.report import RunSummary, collect_runs, decoding_label, format_tables, write_report
from rcpp_hf.methods import load_method
from rcpp_hf.shapesworld.evaluate import EvalSettings, evaluate
from rcpp_hf.shapesworld.model import build_shapesworld_llava
from tests.eval_helpers import options, two_image_annotations, write_mme
from tests.test_eval_runs import RCPP_DEFAULT
from tests.test_shapesworld_evaluate import SMALL


@pytest.fixture(scope="module")
def small_shapesworld(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small-shapesworld")
    model, processor = build_shapesworld_llava(SMALL)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def table_rows(report: str, benchmark: str) -> dict[str, dict[str, str]]:
    """The markdown table of `benchmark` as {run: {column: cell}}."""
    section = report.split(f"## {benchmark}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [cell.strip() for cell in section[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


def test_every_kind_of_run_is_reported_with_its_decoding(
    varied_tiny_path, small_shapesworld, pope_files, tmp_path, make_image_files, capsys
):
    files, images = pope_files
    runs = tmp_path / "runs"
    fastv = tmp_path / "fastv.yaml"
    load_method("fastv", budget=6).to_yaml(fastv)
    random = tmp_path / "random.yaml"
    load_method("random", budget=6).to_yaml(random)
    pope = {
        "vanilla": {},
        "fastv": {"method_config": fastv},
        "rcpp": {"config": RCPP_DEFAULT},
        "rcpp_first_fastv": {"config": "rcpp_first_token", "method_config": fastv},
    }
    for name, settings in pope.items():
        evaluate_pope(files, images, options(varied_tiny_path, runs / "pope" / name, limit=4, **settings))
    make_image_files(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000073.jpg"])
    evaluate_chair(tmp_path / "val2014", two_image_annotations(tmp_path / "annotations"),
                   options(varied_tiny_path, runs / "chair", method_config=random), num_images=2)  # fmt: skip
    evaluate_mme(write_mme(tmp_path / "MME", make_image_files), options(varied_tiny_path, runs / "mme"),
                 subtasks=("existence",))  # fmt: skip
    cdpruner = load_method("cdpruner", budget=4).to_dict()
    for split in ("adversarial", "mme", "captions"):
        settings = EvalSettings(model=small_shapesworld, split=split, num_images=2, limit=3, batch_size=3,
                                max_new_tokens=2, method=cdpruner if split == "adversarial" else None)  # fmt: skip
        evaluate(settings, runs / f"shapesworld_{split}", progress=False)

    assert main(["report", str(runs)]) == 0
    report = (runs / "report.md").read_text()
    assert report in capsys.readouterr().out

    pope_rows = table_rows(report, "pope")
    assert {run: row["decoding"] for run, row in pope_rows.items()} == {
        "pope/vanilla": "greedy",
        "pope/fastv": "fastv(budget=6)",
        "pope/rcpp": "RCPP + DRCD",  # rcpp_default.yaml holds the library defaults
        "pope/rcpp_first_fastv": "RCPP + DRCD(first_token_action=True) + fastv(budget=6)",
    }
    for name in pope:
        metrics = json.loads((runs / "pope" / name / "metrics.json").read_text())
        row = pope_rows[f"pope/{name}"]
        assert row["n"] == "4" and row["model"] == varied_tiny_path.name
        assert [row[key] for key in metrics["headline"]] == [f"{v:.4g}" for v in metrics["headline"].values()]
        assert row["s/item"] == f"{metrics['latency']['seconds_per_item']:.4g}"

    for benchmark, run, decoding in (("chair", "chair", "random(budget=6)"), ("mme", "mme", "greedy")):
        (row,) = table_rows(report, benchmark).values()
        metrics = json.loads((runs / run / "metrics.json").read_text())
        assert row["run"] == run and row["decoding"] == decoding
        assert [row[key] for key in metrics["headline"]] == [f"{v:.4g}" for v in metrics["headline"].values()]

    headline = {"adversarial": ["accuracy", "f1", "yes_ratio"], "mme": ["score", "existence_acc"],
                "captions": ["chair_s", "chair_i", "recall", "length", "partner_hallucination"]}  # fmt: skip
    for split, keys in headline.items():
        (row,) = table_rows(report, f"shapesworld_{split}").values()
        metrics = json.loads((runs / f"shapesworld_{split}" / "metrics.json").read_text())
        assert row["decoding"] == ("cdpruner(budget=4)" if split == "adversarial" else "greedy")
        answers = (runs / f"shapesworld_{split}" / "answers.jsonl").read_text().splitlines()
        assert row["n"] == str(len(answers)) and row["model"] == small_shapesworld.rsplit("/", 1)[-1]
        assert [row[key] for key in keys] == [f"{metrics[key]:.4g}" for key in keys]
        assert row["prefill ms"] == f"{metrics['prefill_ms']:.4g}"
    (row,) = table_rows(report, "shapesworld_adversarial").values()
    assert row["visual tokens"] == "4"  # CDPruner's budget, before layer 0: every layer computes 4

    # Under each benchmark's table, the differences to its one greedy run, paired by id: POPE's to pope/vanilla.
    differences = report.split("## pope\n\n", 1)[1].split("\n\n")[1:3]
    assert differences[0].startswith("Difference to pope/vanilla (run - pope/vanilla) on the paired items, 95% "
                                     "paired bootstrap interval (1000 resamples, seed 0")  # fmt: skip
    lines = differences[1].splitlines()
    assert lines[0] == "| run | decoding | accuracy | f1 |" and len(lines) == 5
    vanilla = json.loads((runs / "pope" / "vanilla" / "metrics.json").read_text())["headline"]
    for line, name in zip(lines[2:], ["fastv", "rcpp", "rcpp_first_fastv"]):
        headline = json.loads((runs / "pope" / name / "metrics.json").read_text())["headline"]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == f"pope/{name}" and cells[1] == pope_rows[f"pope/{name}"]["decoding"]
        for cell, key in zip(cells[2:], ("accuracy", "f1")):
            assert cell.startswith(f"{headline[key] - vanilla[key]:+.3f} [") and cell.endswith(" n=4"), cell
    # A benchmark whose only run is the greedy one, or without a greedy run, has no differences.
    assert report.count("Difference to") == 1
    tables, _ = write_report(runs, reference="rcpp")
    assert "Difference to pope/rcpp (run - pope/rcpp)" in tables and tables.count("Difference to") == 1
    assert "| pope/vanilla | greedy | " in tables
    with pytest.raises(ValueError, match="--reference 'nothing' names no run; the runs: chair, mme, pope/fastv"):
        write_report(runs, reference="nothing")
    assert main(["report", str(runs), "--reference", "pope"]) == 2  # four runs of one benchmark
    assert "--reference 'pope' names 4 runs of pope: pope/fastv," in capsys.readouterr().err

    assert len(collect_runs(runs)) == 9
    for benchmark in ("pope", "chair", "mme", "shapesworld_adversarial", "shapesworld_mme", "shapesworld_captions"):
        assert (runs / f"report_{benchmark}.png").stat().st_size > 1000


def test_decoding_labels_of_recorded_configs():
    assert decoding_label({"do_sample": True}) == "sampling"  # recorded before methods existed
    assert decoding_label({"rcpp": False, "methods": []}) == "greedy"
    assert decoding_label({"rcpp": True, "tau": 0.1, "tau_mode": "quantile", "methods": [], "do_sample": True}) == (
        "RCPP + DRCD(tau=0.1, tau_mode='quantile'), sampling")
    # A method this version cannot load keeps every recorded setting.
    assert decoding_label({"methods": [{"method": "gone", "budget": 3}]}) == "gone(budget=3)"


def test_differences_pair_the_shared_items_and_need_exactly_one_greedy_run(tmp_path):
    """Hand-made ShapesWorld caption runs: a run sharing no caption with the reference shows "-"; two greedy runs
    leave the default reference undecided."""

    def run(name: str, decoding: str, captions: dict[str, int]) -> RunSummary:
        folder = tmp_path / name
        folder.mkdir()
        records = [{"id": id, "mentions": [["a", "a"]] + [["b", "b"]] * wrong, "hallucinated": [["b", "b"]] * wrong,
                    "recalled": ["a"], "ground_truth": ["a"], "length": 3}
                   for id, wrong in captions.items()]  # fmt: skip
        (folder / "answers.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        return RunSummary(name, "shapesworld_captions", "m", decoding, len(records), {}, {}, folder,
                          "shapesworld_captions")  # fmt: skip

    greedy = run("greedy", "greedy", {"c0": 0, "c1": 0, "c2": 1})
    same = run("same", "RCPP + DRCD", {"c2": 1, "c1": 0, "c0": 0})
    elsewhere = run("elsewhere", "fastv(budget=6)", {"d0": 1})
    lines = format_tables([greedy, same, elsewhere]).split("\n\n")[-1].splitlines()
    assert lines[0] == "| run | decoding | chair_s | chair_i | recall |"
    assert lines[2] == "| same | RCPP + DRCD | " + " | ".join(["+0.000 [+0.000, +0.000] n=3"] * 3) + " |"
    assert lines[3] == "| elsewhere | fastv(budget=6) | - | - | - |"
    assert "Difference to" not in format_tables([greedy, run("greedy-2", "greedy", {"c0": 1}), same])
    assert "Difference to greedy-3" in format_tables([greedy, run("greedy-3", "greedy", {"c0": 1})], "greedy-3")
