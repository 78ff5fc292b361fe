"""`rcpp-hf report RUNS` (`rcpp_hf.cli.report`): every run directory under RUNS side by side, as tables and plots.

A run is a folder with config.json and metrics.json (see `run_directory`); its benchmark's "headline"
metrics are the columns, beside the mean generation time and tokens per item. One table and one
figure (a bar chart per headline metric) per benchmark; the tables also go to RUNS/report.md and the
figures to RUNS/report_<benchmark>.png.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunSummary:
    name: str  # the run folder, relative to the report's root
    benchmark: str
    model: str
    decoding: str  # the decoding config file's stem, or "greedy" / "sampling"
    n: int
    headline: dict[str, float]
    latency: dict[str, float]


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
        if "headline" not in metrics:  # a ShapesWorld run (`shapesworld.evaluate`): no headline to tabulate
            continue
        identity = json.loads(config_path.read_text())["identity"]
        config_file = identity["decoding_config_file"]
        sampled = identity["generation_config"].get("do_sample", False)
        runs.append(
            RunSummary(
                name=str(metrics_path.parent.relative_to(root)) if metrics_path.parent != root else root.name,
                benchmark=metrics["benchmark"],
                model=Path(identity["model"]).name,
                decoding=Path(config_file).stem if config_file else ("sampling" if sampled else "greedy"),
                n=metrics["n"],
                headline=metrics["headline"],
                latency=metrics["latency"],
            )
        )
    return runs


def format_tables(runs: list[RunSummary]) -> str:
    """One markdown table per benchmark."""
    sections = []
    for benchmark, group in _by_benchmark(runs).items():
        metric_names = list(dict.fromkeys(name for run in group for name in run.headline))
        header = ["run", "model", "decoding", "n", *metric_names, "s/item", "tokens/item"]
        rows = [
            [run.name, run.model, run.decoding, str(run.n)]
            + [_number(run.headline.get(name)) for name in metric_names]
            + [_number(run.latency["seconds_per_item"]), _number(run.latency["tokens_per_item"])]
            for run in group
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        sections.append(f"## {benchmark}\n\n" + "\n".join(lines))
    return "\n\n".join(sections) + "\n"


def plot_runs(runs: list[RunSummary], folder: str | Path) -> list[Path]:
    """One figure per benchmark, a bar chart per headline metric and for seconds per item."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for benchmark, group in _by_benchmark(runs).items():
        panels = [(name, [run.headline.get(name, float("nan")) for run in group]) for name in group[0].headline]
        panels.append(("seconds per item", [run.latency["seconds_per_item"] for run in group]))
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


def write_report(root: str | Path) -> tuple[str, list[Path]]:
    """Tables (also written to ROOT/report.md) and plots of every run under `root`."""
    runs = collect_runs(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs (metrics.json + config.json) under {root}")
    tables = format_tables(runs)
    (Path(root) / "report.md").write_text(tables)
    return tables, plot_runs(runs, root)


def _by_benchmark(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.benchmark, []).append(run)
    return groups


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
