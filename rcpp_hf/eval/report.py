"""`rcpp-hf report RUNS` (`rcpp_hf.cli.report`): every run directory under RUNS side by side, as tables and plots.

A run is a folder with config.json and metrics.json (see `run_directory`), as the evaluation harness writes it
(`rcpp-hf eval pope / chair / mme`) or as the ShapesWorld evaluation does (`rcpp-hf eval shapesworld`, one table per
split). Its benchmark's headline metrics are the columns, beside its costs: the mean generation time and tokens per
item for the harness's runs, the visual tokens and the prefill and decode times for ShapesWorld's. Each run is
labelled by the decoding its config.json recorded (`decoding_label`), so that runs of different methods are told
apart. One table and one figure (a bar chart per column) per benchmark; the tables also go to RUNS/report.md and the
figures to RUNS/report_<benchmark>.png.

Under each benchmark's table, each run's difference to a reference run of that benchmark (`--reference NAME`: the run
whose folder is NAME or has NAME as one of its parts; by default the run decoded greedily, when the benchmark has
exactly one) on the items both answered, paired by id, with its paired bootstrap interval and the number of paired
items (`rcpp_hf.eval.bootstrap`: 95%, 1000 resamples, seed 0); "-" for a run that shares no item with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from rcpp_hf.eval.bootstrap import BENCHMARKS, LEVEL, RESAMPLES, SEED, benchmark_differences
from rcpp_hf.eval.run_directory import RunDirectory
from rcpp_hf.methods import RCPP, load_method

# The columns of a ShapesWorld run, per kind of split (its metrics.json holds no "headline"); what
# `shapesworld.compare`'s table shows.
SHAPESWORLD_HEADLINE = {
    "pope": ("accuracy", "f1", "yes_ratio"),
    "mme": ("score", "existence_acc", "count_acc", "position_acc", "color_acc"),
    "captions": ("chair_s", "chair_i", "recall", "length", "partner_hallucination"),
}
SHAPESWORLD_COSTS = {"visual_tokens": "visual tokens", "prefill_ms": "prefill ms", "decode_ms": "decode ms/token"}
HARNESS_COSTS = {"seconds_per_item": "s/item", "tokens_per_item": "tokens/item"}
RCPP_LABEL = "RCPP + DRCD"


@dataclass(frozen=True)
class RunSummary:
    name: str  # the run folder, relative to the report's root
    benchmark: str  # the harness's benchmark, or "shapesworld_<split>"
    model: str
    decoding: str  # `decoding_label` of the recorded generation config
    n: int
    headline: dict[str, float]
    costs: dict[str, float]  # column header -> value
    folder: Path | None = None  # the run directory, whose answers.jsonl the differences pair
    scoring: str | None = None  # its entry in `rcpp_hf.eval.bootstrap.BENCHMARKS` ("shapesworld_pope" for a POPE split)


def method_label(spec: dict) -> str:
    """A recorded method (`MethodConfig.to_dict()`) as `name(field=value, ...)` with the fields off its defaults
    (`describe`), or its bare name at its defaults; a method this version cannot load shows every recorded field."""
    try:
        described = load_method(spec).describe()
    except (KeyError, TypeError, ValueError):
        settings = ", ".join(f"{key}={value!r}" for key, value in spec.items() if key != "method")
        return f"{spec.get('method', '?')}({settings})"
    return described.removesuffix("()")


def decoding_label(generation_config: dict) -> str:
    """What a run decoded with, from its recorded generation config (`RCPPGenerationConfig.to_dict()` or its diff):
    "RCPP + DRCD" (with its settings off the library defaults in parentheses) when RCPP is on, then each registry
    method (`method_label`), joined by " + "; "greedy" or "sampling" when neither; ", sampling" after a sampled one.
    Runs recorded before the methods existed (no "methods", no "rcpp") read as vanilla."""
    parts = []
    if generation_config.get("rcpp"):
        names = {f.name for f in fields(RCPP)}
        rcpp = {key: value for key, value in generation_config.items() if key in names}
        parts.append(RCPP_LABEL + method_label({"method": RCPP.name, **rcpp}).removeprefix(RCPP.name))
    parts += [method_label(spec) for spec in generation_config.get("methods", ())]
    sampled = generation_config.get("do_sample", False)
    if not parts:
        return "sampling" if sampled else "greedy"
    return " + ".join(parts) + (", sampling" if sampled else "")


def collect_runs(root: str | Path) -> list[RunSummary]:
    """Every finished run (a metrics.json beside a config.json) under `root`, sorted by folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder not found: {root}")
    runs = []
    for metrics_path in sorted(root.rglob("metrics.json")):
        config_path = metrics_path.with_name("config.json")
        if not config_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        identity = json.loads(config_path.read_text())["identity"]
        name = str(metrics_path.parent.relative_to(root)) if metrics_path.parent != root else root.name
        if "benchmark" in metrics:
            runs.append(_harness_run(name, metrics_path.parent, identity, metrics))
        elif "split" in metrics:
            runs.append(_shapesworld_run(name, metrics_path.parent, identity, metrics))
    return runs


def _harness_run(name: str, folder: Path, identity: dict, metrics: dict) -> RunSummary:
    """A run of `eval.harness` (POPE, CHAIR, MME): its identity records the model and the generation config."""
    return RunSummary(
        name=name,
        benchmark=metrics["benchmark"],
        model=Path(identity["model"]).name,
        decoding=decoding_label(identity["generation_config"]),
        n=metrics["n"],
        headline=metrics["headline"],
        costs={header: metrics["latency"][key] for key, header in HARNESS_COSTS.items()},
        folder=folder,
        scoring=metrics["benchmark"],
    )


def _shapesworld_run(name: str, folder: Path, identity: dict, metrics: dict) -> RunSummary:
    """A run of `shapesworld.evaluate`: its identity holds the settings (model, split, ...) and the generation
    config; its metrics are flat, one split's, over the answers in answers.jsonl."""
    split = metrics["split"]
    kind = split if split in SHAPESWORLD_HEADLINE else "pope"
    with open(folder / "answers.jsonl", encoding="utf-8") as answers:  # MME's scores carry no count
        n = sum(1 for line in answers if line.strip())
    return RunSummary(
        name=name,
        benchmark=f"shapesworld_{split}",
        model=Path(identity["settings"]["model"]).name,
        decoding=decoding_label(identity["generation_config"]),
        n=n,
        headline={key: metrics[key] for key in SHAPESWORLD_HEADLINE[kind] if key in metrics},
        costs={header: metrics[key] for key, header in SHAPESWORLD_COSTS.items() if key in metrics},
        folder=folder,
        scoring=f"shapesworld_{kind}",
    )


def reference_runs(runs: list[RunSummary], reference: str | None = None) -> dict[str, RunSummary]:
    """benchmark -> its reference run: with `reference`, the run whose folder is `reference` or has it as one of its
    parts (e.g. "vanilla" names compare's "vanilla/captions"); without, the run decoded "greedy" when the benchmark
    has exactly one. A `reference` that names no run, or two runs of one benchmark, is refused."""
    chosen = {}
    for benchmark, group in _by_benchmark(runs).items():
        if reference is None:
            matches = [run for run in group if run.decoding == "greedy"]
            matches = matches if len(matches) == 1 else []
        else:
            matches = [run for run in group if reference in (run.name, *Path(run.name).parts)]
            if len(matches) > 1:
                raise ValueError(f"--reference {reference!r} names {len(matches)} runs of {benchmark}: "
                                 + ", ".join(run.name for run in matches))  # fmt: skip
        chosen |= {benchmark: matches[0]} if matches else {}
    if reference is not None and not chosen:
        raise ValueError(f"--reference {reference!r} names no run; the runs: " + ", ".join(run.name for run in runs))
    return chosen


def difference_table(group: list[RunSummary], reference: RunSummary, level: float = LEVEL) -> str:
    """Each run's difference to `reference` (run - reference) on the paired items, with its paired bootstrap
    interval and n (`benchmark_differences`); "" when the benchmark has no other run or no way to pair."""
    others = [run for run in group if run is not reference]
    if not others or reference.folder is None or reference.scoring not in BENCHMARKS:
        return ""
    metrics = BENCHMARKS[reference.scoring].metrics
    base = RunDirectory(reference.folder).read_answers()
    header = ["run", "decoding", *metrics]
    lines = [f"Difference to {reference.name} (run - {reference.name}) on the paired items, {level:.0%} paired "
             f"bootstrap interval ({RESAMPLES} resamples, seed {SEED}; * when it excludes 0), n paired items:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for run in others:
        answers = RunDirectory(run.folder).read_answers() if run.folder is not None else []
        differences = benchmark_differences(reference.scoring, answers, base, level=level)
        cells = [differences[metric].cell() if metric in differences else "-" for metric in metrics]
        lines.append("| " + " | ".join([run.name, run.decoding, *cells]) + " |")
    return "\n".join(lines)


def format_tables(runs: list[RunSummary], reference: str | None = None) -> str:
    """One markdown table per benchmark, each followed by the differences to its reference run (`reference_runs`,
    `difference_table`)."""
    references = reference_runs(runs, reference)
    sections = []
    for benchmark, group in _by_benchmark(runs).items():
        metric_names = list(dict.fromkeys(name for run in group for name in run.headline))
        cost_names = list(dict.fromkeys(name for run in group for name in run.costs))
        header = ["run", "model", "decoding", "n", *metric_names, *cost_names]
        rows = [
            [run.name, run.model, run.decoding, str(run.n)]
            + [_number(run.headline.get(name)) for name in metric_names]
            + [_number(run.costs.get(name)) for name in cost_names]
            for run in group
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        sections.append(f"## {benchmark}\n\n" + "\n".join(lines))
        differences = difference_table(group, references[benchmark]) if benchmark in references else ""
        sections += [differences] if differences else []
    return "\n\n".join(sections) + "\n"


def plot_runs(runs: list[RunSummary], folder: str | Path) -> list[Path]:
    """One figure per benchmark, a bar chart per headline metric and per cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for benchmark, group in _by_benchmark(runs).items():
        panels = [(name, [run.headline.get(name, float("nan")) for run in group])
                  for name in dict.fromkeys(name for run in group for name in run.headline)]
        panels += [(name, [run.costs.get(name, float("nan")) for run in group])
                   for name in dict.fromkeys(name for run in group for name in run.costs)]  # fmt: skip
        figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2 + 0.15 * len(group)), squeeze=False)
        labels = [run.name for run in group]
        for axis, (name, values) in zip(axes[0], panels):
            axis.bar(range(len(group)), values, color=[f"C{i % 10}" for i in range(len(group))])
            axis.set_title(name)
            axis.set_xticks(range(len(group)), labels, rotation=45, ha="right", fontsize=8)
        figure.suptitle(benchmark)
        figure.tight_layout()
        path = Path(folder) / f"report_{benchmark}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(root: str | Path, reference: str | None = None) -> tuple[str, list[Path]]:
    """Tables (also written to ROOT/report.md), with each benchmark's differences to its reference run
    (`format_tables`), and plots of every run under `root`."""
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (metrics.json + config.json) under {root}")
    tables = format_tables(runs, reference)
    (Path(root) / "report.md").write_text(tables)
    return tables, plot_runs(runs, root)


def _by_benchmark(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.benchmark, []).append(run)
    return groups


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
