"""Paired bootstrap intervals (`rcpp_hf.eval.bootstrap`) on hand-made records: zero and planted differences,
determinism, pairing by id, CHAIR_I resampled as a ratio of sums, and one run's own interval."""

import numpy as np
import pytest

from rcpp_hf.eval.bootstrap import (
    BY_ITEM,
    BY_MME_IMAGE,
    BY_SPLIT_ITEM,
    benchmark_differences,
    benchmark_interval,
    bootstrap_differences,
    bootstrap_interval,
    draw,
    paired_bootstrap,
    paired_units,
    resample,
)
from rcpp_hf.eval.chair import summarize_chair
from rcpp_hf.eval.mme import mme_scores
from rcpp_hf.eval.pope import pope_metrics, summarize_pope


def pope_records(predictions: list[str], labels: list[str], split: str = "adversarial") -> list[dict]:
    return [{"id": f"{split}/{i}", "split": split, "label": label, "prediction": prediction}
            for i, (prediction, label) in enumerate(zip(predictions, labels))]  # fmt: skip


def caption(id: str, hallucinated: int, correct: int, ground_truth: int = 2) -> dict:
    """A CHAIR record with `correct` mentions of ground-truth classes and `hallucinated` mentions of others."""
    truth = [f"t{i}" for i in range(ground_truth)]
    right = [(name, name) for name in truth[:correct]]
    wrong = [(f"h{i}", f"h{i}") for i in range(hallucinated)]
    return {"id": id, "mentions": right + wrong, "hallucinated": wrong, "recalled": [name for name, _ in right],
            "ground_truth": truth, "length": 10}  # fmt: skip


def pope_score(records):
    return pope_metrics([r["label"] for r in records], [r["prediction"] for r in records])


LABELS = ["yes", "no"] * 40


def test_identical_runs_give_exactly_zero():
    rng = np.random.default_rng(3)
    records = pope_records(list(rng.choice(["yes", "no"], size=80)), LABELS)
    differences = paired_bootstrap(records, records, pope_score, ("accuracy", "f1"))
    for difference in differences.values():
        assert (difference.value, difference.low, difference.high, difference.n) == (0.0, 0.0, 0.0, 80)
        assert not difference.excludes_zero


def test_a_zero_difference_contains_zero_and_a_planted_one_excludes_it():
    # Two runs wrong on as many questions, different ones: a difference of 0 with an interval around it.
    flip = {"yes": "no", "no": "yes"}
    run = pope_records([label if i % 4 else flip[label] for i, label in enumerate(LABELS)], LABELS)
    other = pope_records([label if i % 4 != 1 else flip[label] for i, label in enumerate(LABELS)], LABELS)
    accuracy = paired_bootstrap(run, other, pope_score, ("accuracy",))["accuracy"]
    assert accuracy.value == 0 and accuracy.low < 0 < accuracy.high and accuracy.level == 0.95
    # Always right against right on half of the questions: +0.5, far from 0.
    perfect = pope_records(LABELS, LABELS)
    half = pope_records([label if i % 2 else "no" for i, label in enumerate(LABELS)], LABELS)
    accuracy = paired_bootstrap(perfect, half, pope_score, ("accuracy",))["accuracy"]
    assert accuracy.value == pytest.approx(0.5) and accuracy.low > 0 and accuracy.excludes_zero
    assert accuracy.cell().endswith("]* n=80")
    wider = paired_bootstrap(perfect, half, pope_score, ("accuracy",), level=0.99)["accuracy"]
    assert wider.low <= accuracy.low and wider.high >= accuracy.high and wider.level == 0.99


def test_the_seed_fixes_the_interval():
    run = pope_records([label if i % 3 else "yes" for i, label in enumerate(LABELS)], LABELS)
    reference = pope_records([label if i % 5 else "no" for i, label in enumerate(LABELS)], LABELS)
    first = paired_bootstrap(run, reference, pope_score, ("f1",))
    assert first == paired_bootstrap(run, reference, pope_score, ("f1",), seed=0)
    assert first != paired_bootstrap(run, reference, pope_score, ("f1",), seed=1)
    assert bootstrap_differences(run, reference, pope_score, ("f1",), resamples=7).shape == (7, 1)


def test_records_are_paired_by_id_whatever_their_order_and_unshared_ids_left_out():
    run = pope_records([label if i % 3 else "yes" for i, label in enumerate(LABELS)], LABELS)
    reference = pope_records([label if i % 5 else "no" for i, label in enumerate(LABELS)], LABELS)
    expected = paired_bootstrap(run, reference, pope_score, ("accuracy", "f1"))
    shuffled = [run[i] for i in np.random.default_rng(0).permutation(len(run))]
    extra = [{"id": "elsewhere/0", "label": "yes", "prediction": "no"}]
    assert paired_bootstrap(shuffled + extra, reference, pope_score, ("accuracy", "f1")) == expected
    # A run with only half of the ids: the difference is over those 40.
    half = paired_bootstrap(run[::2], reference, pope_score, ("accuracy",))["accuracy"]
    assert half.n == 40 and half.value == pytest.approx(pope_score(run[::2])["accuracy"]
                                                         - pope_score(reference[::2])["accuracy"])  # fmt: skip
    assert paired_bootstrap(run, pope_records(LABELS, LABELS, split="random"), pope_score, ("f1",)) == {}


def test_chair_i_is_a_ratio_of_sums_over_the_resampled_captions():
    run = [caption("a", hallucinated=1, correct=1), caption("b", hallucinated=0, correct=2),
           caption("c", hallucinated=3, correct=1)]  # fmt: skip
    reference = [caption("c", hallucinated=1, correct=1), caption("a", hallucinated=0, correct=1),
                 caption("b", hallucinated=0, correct=2)]  # fmt: skip
    strata = paired_units(run, reference)
    assert [[[pair[0]["id"] for pair in unit] for unit in units] for units in strata] == [[["c"], ["a"], ["b"]]]
    # The resample c, c, b: run CHAIR_I = (3 + 3 + 0) / (4 + 4 + 2), not the mean of 3/4, 3/4, 0.
    run_sample, reference_sample = resample(strata, [np.array([0, 0, 2])])
    assert summarize_chair(run_sample)["chair_i"] == 6 / 10
    assert summarize_chair(reference_sample)["chair_i"] == (1 + 1 + 0) / (2 + 2 + 2)
    assert summarize_chair(run_sample)["recall"] == (1 + 1 + 2) / 6
    # The bootstrap's first resample is the first draw of the seeded generator.
    indices = draw(strata, np.random.default_rng(0))
    run_sample, reference_sample = resample(strata, indices)
    (first,) = bootstrap_differences(run, reference, summarize_chair, ("chair_i",), resamples=1)
    assert first[0] == summarize_chair(run_sample)["chair_i"] - summarize_chair(reference_sample)["chair_i"]
    difference = benchmark_differences("chair", run, reference)
    assert difference["chair_i"].value == pytest.approx(4 / 8 - 1 / 5) and difference["chair_i"].n == 3
    assert set(difference) == {"chair_s", "chair_i", "recall"}


def test_mme_draws_whole_images_within_subtasks():
    records = []
    for subtask in ("existence", "count"):
        for image in range(12):  # images 0-5 answered "yes" to their "no" question
            for question, label in enumerate(("yes", "no")):
                records.append({"id": f"{subtask}/{image}/{question}", "subtask": subtask, "image": f"{image}.png",
                                "label": label, "prediction": label if image > 5 else "yes"})  # fmt: skip
    strata = paired_units(records, records, BY_MME_IMAGE)
    assert [len(units) for units in strata] == [12, 12] and all(len(unit) == 2 for units in strata for unit in units)
    # Image 7 drawn four times is four images: acc+ 1, not one image of 8 answers.
    run_sample, _ = resample(strata, [np.array([7] * 4), np.array([0] * 4)], BY_MME_IMAGE)
    scores = mme_scores(run_sample)["subtasks"]
    assert scores["existence"]["n_images"] == 4 and scores["existence"]["acc_plus"] == 1.0
    assert scores["count"]["acc"] == 0.5 and scores["count"]["acc_plus"] == 0.0
    perfect = [dict(record, prediction=record["label"]) for record in records]
    difference = benchmark_differences("shapesworld_mme", perfect, records)["score"]
    assert difference.n == 24 and difference.value == pytest.approx(2 * (100 * 6 / 24 + 100 * 6 / 12))
    assert difference.low > 0


def test_harness_pope_resamples_within_each_split():
    records = pope_records(LABELS[:20], LABELS[:20], "random") + pope_records(["yes"] * 60, LABELS[:60], "popular")
    strata = paired_units(records, records, BY_SPLIT_ITEM)
    assert [len(units) for units in strata] == [20, 60]
    assert paired_units(records, records, BY_ITEM)[0][0][0][0]["id"] == "random/0"
    perfect = [dict(record, prediction=record["label"]) for record in records]
    difference = benchmark_differences("pope", perfect, records)["accuracy"]
    assert difference.value == pytest.approx(1 - summarize_pope(records)["headline"]["accuracy"])
    assert difference.n == 80 and difference.low > 0


def test_a_single_run_interval_holds_its_value_and_is_a_point_for_a_constant_metric():
    run = pope_records([label if i % 3 else "yes" for i, label in enumerate(LABELS)], LABELS)
    intervals = benchmark_interval("shapesworld_pope", run, ("f1", "yes_ratio"))
    assert set(intervals) == {"f1", "yes_ratio"}
    for metric, interval in intervals.items():
        assert interval.value == pope_score(run)[metric] and interval.n == 80 and interval.level == 0.95
        assert interval.low < interval.value < interval.high
    assert intervals == benchmark_interval("shapesworld_pope", run, ("f1", "yes_ratio"), seed=0)
    assert intervals != benchmark_interval("shapesworld_pope", run, ("f1", "yes_ratio"), seed=1)
    # Every question answered "yes": the yes-ratio is 1 on every resample.
    always = bootstrap_interval(pope_records(["yes"] * 80, LABELS), pope_score, ("yes_ratio",))["yes_ratio"]
    assert (always.value, always.low, always.high) == (1.0, 1.0, 1.0)
    # Captions each with one of two mentions hallucinated and one of two classes recalled: CHAIR_I, recall 1/2 always.
    captions = [caption(str(i), hallucinated=1, correct=1) for i in range(5)]
    chair = benchmark_interval("shapesworld_captions", captions, ("chair_i", "recall"))
    assert all((i.value, i.low, i.high, i.n) == (0.5, 0.5, 0.5, 5) for i in chair.values())
    varied = benchmark_interval("chair", [caption("a", 1, 1), caption("b", 0, 2), caption("c", 3, 1)])["chair_i"]
    assert varied.value == pytest.approx(4 / 8) and varied.low <= varied.value <= varied.high
    assert bootstrap_interval([], pope_score, ("f1",)) == {}
