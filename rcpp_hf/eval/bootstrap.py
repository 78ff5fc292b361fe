"""Paired bootstrap intervals: whether a metric's difference between two runs of the same items is noise.

Two runs of one benchmark (the same questions, captions or images, matched by their record `id`) are compared on the
items they share. Each bootstrap resample draws the resampling units with replacement, the same draw for both runs,
recomputes the metric on each run's resampled records with the library's own scorer (`summarize_chair`,
`pope_metrics` / `summarize_pope`, `mme_scores`) and keeps the difference `run - reference`. The interval is the
percentile interval of those differences (`level`, default 95%: the 2.5th and 97.5th percentiles, numpy's linear
quantiles), over `RESAMPLES` (1000) resamples drawn by `numpy.random.default_rng(SEED)` (seed 0): the same records
give the same interval.

The unit is what the metric is a statistic of: a caption for CHAIR (CHAIR_I and recall are ratios of sums over
captions, recomputed from the resampled captions' counts, not averaged per caption), a question for POPE (resampled
within each split when the records have one, as the harness's headline averages its splits), an image for MME
(resampled within each subtask, both of its questions together, so that acc+ stays a statistic of whole images; a
copy drawn twice counts as two images). Identical runs give exactly [0, 0].

`bootstrap_interval` (and `benchmark_interval`) is the same resampling of one run alone: the percentile interval of a
metric itself rather than of a difference, e.g. for error bars on a plot of runs; a constant metric gives [v, v].
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from rcpp_hf.eval.chair import summarize_chair
from rcpp_hf.eval.mme import mme_scores, mme_table_metrics
from rcpp_hf.eval.pope import pope_metrics, summarize_pope

SEED = 0
RESAMPLES = 1000
LEVEL = 0.95

Pair = tuple[dict, dict]  # (the run's record, the reference's record) of one id


@dataclass(frozen=True)
class Resampling:
    """What one bootstrap draw picks.

    Args:
        unit: record fields whose values together name the unit drawn (e.g. ("id",): each question alone;
            ("subtask", "image"): an MME image with both of its questions).
        stratum: a record field; units are drawn within each of its values, as many as it holds (None: one stratum).
        distinct: a record field made distinct per draw (its value + "#<draw>"), so that a unit drawn twice is two
            units to the scorer (MME's scorer groups an image's questions by "image"); None: left as it is.
    """

    unit: tuple[str, ...] = ("id",)
    stratum: str | None = None
    distinct: str | None = None


BY_ITEM = Resampling()
BY_SPLIT_ITEM = Resampling(stratum="split")
BY_MME_IMAGE = Resampling(unit=("subtask", "image"), stratum="subtask", distinct="image")


@dataclass(frozen=True)
class Benchmark:
    """How the runs of one benchmark are bootstrapped: `score(records) -> {metric: value}` (the library's scorer),
    the `metrics` of it whose differences are reported, and the `resampling`."""

    score: Callable[[list[dict]], dict]
    metrics: tuple[str, ...]
    resampling: Resampling = BY_ITEM


def _pope_questions(records: list[dict]) -> dict:
    return pope_metrics([record["label"] for record in records], [record["prediction"] for record in records])


CHAIR_METRICS = ("chair_s", "chair_i", "recall")
# By the benchmark of `eval.report` ("shapesworld_pope" for each of ShapesWorld's POPE splits).
BENCHMARKS = {
    "pope": Benchmark(lambda records: summarize_pope(records)["headline"], ("accuracy", "f1"), BY_SPLIT_ITEM),
    "chair": Benchmark(summarize_chair, CHAIR_METRICS),
    "mme": Benchmark(lambda records: mme_scores(records)["headline"], ("perception", "cognition", "hallucination"),
                     BY_MME_IMAGE),  # fmt: skip
    "shapesworld_pope": Benchmark(_pope_questions, ("accuracy", "f1")),
    "shapesworld_mme": Benchmark(mme_table_metrics, ("score",), BY_MME_IMAGE),
    "shapesworld_captions": Benchmark(summarize_chair, CHAIR_METRICS),
}


@dataclass(frozen=True)
class Difference:
    """`value` = metric(run) - metric(reference) on the `n` paired units; [`low`, `high`] its `level` interval."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"difference": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict) -> Difference:
        return cls(data["difference"], data["low"], data["high"], data["n"], data["level"])

    def cell(self) -> str:
        """"+0.012 [-0.020, +0.045] n=50", with a "*" after the interval when it excludes 0."""
        mark = "*" if self.excludes_zero else ""
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]{mark} n={self.n}"


def paired_units(run: list[dict], reference: list[dict], resampling: Resampling = BY_ITEM) -> list[list[list[Pair]]]:
    """The records of the ids both runs hold, paired, as strata -> units -> pairs, in the reference's order (the
    stratum and unit read from the reference's record). Shape: [n_strata][n_units of the stratum][records of the
    unit]."""
    by_id = {record["id"]: record for record in run}
    strata: dict[Hashable, dict[Hashable, list[Pair]]] = {}
    for record in reference:
        if record["id"] not in by_id:
            continue
        stratum = None if resampling.stratum is None else record[resampling.stratum]
        unit = tuple(record[field] for field in resampling.unit)
        strata.setdefault(stratum, {}).setdefault(unit, []).append((by_id[record["id"]], record))
    return [list(units.values()) for units in strata.values()]


def draw(strata: list[list[list[Pair]]], rng: np.random.Generator) -> list[np.ndarray]:
    """One resample's unit indices: per stratum, as many as it has units, drawn with replacement."""
    return [rng.integers(0, len(units), size=len(units)) for units in strata]


def resample(strata: list[list[list[Pair]]], draws: list[np.ndarray],
             resampling: Resampling = BY_ITEM) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(the run's records, the reference's records) of the drawn units, the k-th drawn unit's `distinct` field
    suffixed "#k"."""
    run, reference = [], []
    for units, indices in zip(strata, draws):
        for k, index in enumerate(indices):
            for run_record, reference_record in units[index]:
                if resampling.distinct is not None:
                    suffix = {resampling.distinct: f"{run_record[resampling.distinct]}#{k}"}
                    run_record, reference_record = {**run_record, **suffix}, {**reference_record, **suffix}
                run.append(run_record)
                reference.append(reference_record)
    return run, reference


def bootstrap_differences(run: list[dict], reference: list[dict], score: Callable[[list[dict]], dict],
                          metrics: tuple[str, ...], resampling: Resampling = BY_ITEM, resamples: int = RESAMPLES,
                          seed: int = SEED) -> np.ndarray:  # fmt: skip
    """metric(run) - metric(reference) on each resample of the paired units: shape (resamples, len(metrics))."""
    strata = paired_units(run, reference, resampling)
    rng = np.random.default_rng(seed)
    differences = np.empty((resamples, len(metrics)))
    for b in range(resamples):
        run_sample, reference_sample = resample(strata, draw(strata, rng), resampling)
        run_scores, reference_scores = score(run_sample), score(reference_sample)
        differences[b] = [run_scores[metric] - reference_scores[metric] for metric in metrics]
    return differences


def check_interval_settings(level: float, resamples: int) -> None:
    """Refuse a coverage outside (0, 1) or fewer than one resample, naming the value."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def percentile_bounds(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (metrics,): the `level` percentile interval of (resamples, metrics) `samples`."""
    return np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)


def paired_bootstrap(run: list[dict], reference: list[dict], score: Callable[[list[dict]], dict],
                     metrics: tuple[str, ...], resampling: Resampling = BY_ITEM, resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = SEED) -> dict[str, Difference]:  # fmt: skip
    """Each metric's difference run - reference on the paired items, with its `level` percentile interval over
    `resamples` paired resamples (`bootstrap_differences`); {} when the runs share no item.

    Args:
        run, reference: records (answers.jsonl's), each with an "id" and what `score` and `resampling` read.
        score: the library's scorer of a list of records, returning at least `metrics`.
        level: the interval's coverage in (0, 1), e.g. 0.95 for the 2.5th to 97.5th percentiles.
    """
    check_interval_settings(level, resamples)
    strata = paired_units(run, reference, resampling)
    if not strata:
        return {}
    paired_run, paired_reference = resample(strata, [np.arange(len(units)) for units in strata], resampling)
    run_scores, reference_scores = score(paired_run), score(paired_reference)
    samples = bootstrap_differences(run, reference, score, metrics, resampling, resamples, seed)
    low, high = percentile_bounds(samples, level)
    n = sum(len(units) for units in strata)
    return {metric: Difference(run_scores[metric] - reference_scores[metric], float(low[i]), float(high[i]), n, level)
            for i, metric in enumerate(metrics)}  # fmt: skip


def benchmark_differences(benchmark: str, run: list[dict], reference: list[dict], resamples: int = RESAMPLES,
                          level: float = LEVEL, seed: int = SEED) -> dict[str, Difference]:  # fmt: skip
    """`paired_bootstrap` with the scorer, metrics and resampling of `BENCHMARKS[benchmark]`."""
    spec = BENCHMARKS[benchmark]
    return paired_bootstrap(run, reference, spec.score, spec.metrics, spec.resampling, resamples, level, seed)


@dataclass(frozen=True)
class Interval:
    """`value` = metric(run) on its `n` units; [`low`, `high`] its `level` percentile interval."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict) -> Interval:
        return cls(data["value"], data["low"], data["high"], data["n"], data["level"])


def bootstrap_interval(records: list[dict], score: Callable[[list[dict]], dict], metrics: tuple[str, ...],
                       resampling: Resampling = BY_ITEM, resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> dict[str, Interval]:  # fmt: skip
    """Each metric of one run with its `level` percentile interval over `resamples` resamples of its units (drawn as
    `paired_bootstrap` draws them, the run paired with itself); {} for no records."""
    check_interval_settings(level, resamples)
    strata = paired_units(records, records, resampling)
    if not strata:
        return {}
    scores = score(resample(strata, [np.arange(len(units)) for units in strata], resampling)[0])
    rng = np.random.default_rng(seed)
    samples = np.empty((resamples, len(metrics)))
    for b in range(resamples):
        sample_scores = score(resample(strata, draw(strata, rng), resampling)[0])
        samples[b] = [sample_scores[metric] for metric in metrics]
    low, high = percentile_bounds(samples, level)
    n = sum(len(units) for units in strata)
    return {metric: Interval(scores[metric], float(low[i]), float(high[i]), n, level)
            for i, metric in enumerate(metrics)}  # fmt: skip


def benchmark_interval(benchmark: str, records: list[dict], metrics: tuple[str, ...] | None = None,
                       resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = SEED) -> dict[str, Interval]:  # fmt: skip
    """`bootstrap_interval` with the scorer and resampling of `BENCHMARKS[benchmark]`, of its metrics or of `metrics`
    (any its scorer returns, e.g. POPE's "yes_ratio")."""
    spec = BENCHMARKS[benchmark]
    return bootstrap_interval(records, spec.score, metrics or spec.metrics, spec.resampling, resamples, level, seed)
