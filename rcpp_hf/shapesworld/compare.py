"""`rcpp-hf shapesworld compare`: decoding settings side by side on ShapesWorld.

`compare` is the comparison across methods and budgets: vanilla, RCPP + DRCD (the registry method `rcpp` at its defaults), and
every method of the registry, a method with a `budget` setting at each budget (by default 64 / 128 / 192 of
LLaVA-1.5's 576 visual tokens as fractions of the image, 0.1111 / 0.2222 / 0.3333; a budget is a count of the model's
image or a fraction of it, `methods/budget.py`). A row is labelled by the budget as given, `<method>-<budget>` (e.g.
"fastv-0.2222", "fastv-22"; `budget_label`), and the table's budget column adds what it resolved to on this model
("0.2222 = 22 of 100"). Each setting runs on each split in its own resumable folder
(`<output-dir>/<setting>/<split>`, `evaluate.py`); it writes `table.md`, `table.json`, `table.png` and
`quality.png`: POPE F1 per split, CHAIR_I and recall against the visual tokens the prefill computed (averaged over
layers, i.e. the budget) and against prefill / decode time (the streamer-timed generate calls of the runs). Rows come
from the registry, so a method added there gets its rows without touching this command. A budget a method cannot
meet on this model (e.g. FastV's first layers alone exceed it on a shallow decoder) gives a row marked as skipped,
with the method's reason (the reachable range, for an unreachable budget).

Beside each row's metrics, `table.md` and `table.json` give its difference to a reference row (`reference`, default
"vanilla"; `--reference NAME`) on the items both ran (the same questions, MME images and captions, paired by id):
POPE accuracy and F1, the MME score, CHAIR_S, CHAIR_I and recall, each with its paired bootstrap interval (95%, 1000
resamples, seed 0: `rcpp_hf.eval.bootstrap`) and the number of paired items; a row skipped or without the split shows
"-".

Each row's points on `frontier.png` (CHAIR_I against recall, POPE adversarial F1 against its yes-ratio) carry error
bars: the row's own bootstrap percentile interval of each metric (over its captions, over its questions; the same
level, resamples and seed), also in `table.json` as the row's `intervals`.

The studies in the repository's `experiments/` (`defaults_sweep.py`, `head_ablation.py`, `condensation.py`) run
their rows through `compare`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rcpp_hf.auto import model_shape as checkpoint_shape  # noqa: E402
from rcpp_hf.eval.bootstrap import (  # noqa: E402
    BENCHMARKS,
    LEVEL,
    RESAMPLES,
    SEED,
    Difference,
    benchmark_differences,
    benchmark_interval,
)
from rcpp_hf.eval.run_directory import RunDirectory  # noqa: E402
from rcpp_hf.methods import METHODS, load_method  # noqa: E402
from rcpp_hf.methods.budget import budget_label, published_fraction, resolve_budget  # noqa: E402
from rcpp_hf.methods.contrastive_decoder import ContrastiveDecoder  # noqa: E402
from rcpp_hf.presets import METHODS as METHOD_PRESETS  # noqa: E402
from rcpp_hf.presets import preset_kind  # noqa: E402
from rcpp_hf.shapesworld.evaluate import EvalSettings, evaluate  # noqa: E402
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS  # noqa: E402

VANILLA = "vanilla"
RCPP = "rcpp"
RCPP_PRESET = "rcpp_default"  # the shipped generation preset of the library defaults
# EasonAI-5589/LLaVA-FinePruner-Head's budgets, 64 / 128 / 192 of 576 visual tokens, as fractions of the image.
BUDGETS = tuple(published_fraction(count) for count in (64, 128, 192))
COLUMNS = {  # split -> (metric, header)
    "random": [("accuracy", "rand acc"), ("f1", "rand F1"), ("yes_ratio", "rand yes")],
    "popular": [("accuracy", "pop acc"), ("f1", "pop F1"), ("yes_ratio", "pop yes")],
    "adversarial": [("accuracy", "adv acc"), ("f1", "adv F1"), ("yes_ratio", "adv yes")],
    "mme": [("existence_acc", "MME exist"), ("count_acc", "MME count"), ("position_acc", "MME pos"),
            ("color_acc", "MME color"), ("score", "MME score")],  # fmt: skip
    "captions": [("chair_s", "CHAIR_S"), ("chair_i", "CHAIR_I"), ("recall", "recall"), ("length", "len"),
                 ("partner_hallucination", "partner"), ("visual_kept", "KV kept")],  # fmt: skip
}
COST_COLUMNS = [("visual_tokens", "visual tokens"), ("prefill_ms", "prefill ms"), ("decode_ms", "decode ms/tok")]
QUALITY = [("random.f1", "POPE F1 (random)"), ("popular.f1", "POPE F1 (popular)"),
           ("adversarial.f1", "POPE F1 (adversarial)"), ("captions.chair_i", "CHAIR_I"),
           ("captions.recall", "recall")]  # fmt: skip
COSTS = [("visual_tokens", "visual tokens in prefill (mean over layers)"), ("prefill_ms", "prefill ms / item"),
         ("decode_ms", "decode ms / token")]  # fmt: skip

@dataclass(frozen=True)
class Setting:
    """One row of the comparison.

    Args:
        name: the row and its folder, e.g. "vanilla", "rcpp", "fastv-0.2222".
        family: the line it belongs to in the plots ("vanilla", "rcpp", a registry name, "fastv+rcpp").
        config: RCPP YAML preset, or None (greedy, RCPP off).
        method: a registry method (`MethodConfig.to_dict()`) added to the decoding, or None.
        budget: the row's budget as given to its method (a count of the model's image or a fraction), or None.
    """

    name: str
    family: str
    config: str | None = None
    method: dict | None = None
    budget: int | float | None = None


def config_setting(config: str) -> Setting:
    """The row of `VANILLA`, of a generation (RCPP) preset, or of a method preset (one with a `method` key, e.g. a
    trained `gan_pruner` with its `pruner_path`), named after its file; a preset is a path or a shipped name."""
    if config == VANILLA:
        return Setting(VANILLA, VANILLA)
    if preset_kind(config) == METHOD_PRESETS:
        method = load_method(config)
        return Setting(Path(config).stem, method.name, method=method.to_dict())
    return Setting(Path(config).stem, RCPP, config=str(config))


def runs_with_defaults(name: str) -> bool:
    """Whether registry method `name` runs with its default settings (a `gan_pruner` needs its trained pruners)."""
    try:
        load_method(name)
    except ValueError:
        return False
    return True


def method_settings(name: str, budgets: tuple[int | float, ...], with_rcpp: bool = False) -> list[Setting]:
    """The rows of registry method `name`: one per budget, `<name>-<budget>`, when it has a `budget` setting, else one
    with its defaults; with `with_rcpp`, the same again composed with RCPP + DRCD."""
    family = name + "+rcpp" if with_rcpp else name
    config = RCPP_PRESET if with_rcpp else None
    if "budget" not in load_method(name).to_dict():
        return [Setting(family, family, config, load_method(name).to_dict())]
    return [Setting(f"{family}-{budget_label(budget)}", family, config, load_method(name, budget=budget).to_dict(),
                    budget)  # fmt: skip
            for budget in budgets]  # fmt: skip


def comparison_settings(methods: list[str], budgets: tuple[int | float, ...],
                        with_rcpp: bool = False) -> list[Setting]:  # fmt: skip
    """The rows for `methods`: `VANILLA` or registry names (`RCPP`, "rcpp": RCPP + DRCD with the library defaults);
    with `with_rcpp`, each registry method but RCPP itself again composed with RCPP + DRCD."""
    settings = []
    for name in methods:
        if name == VANILLA:
            settings.append(Setting(VANILLA, VANILLA))
        elif name in METHODS:
            settings += method_settings(name, budgets)
            settings += method_settings(name, budgets, with_rcpp=True) if with_rcpp and name != RCPP else []
        else:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join([VANILLA, *METHODS])}")
    return settings


def model_shape(model: str) -> tuple[int, int]:
    """(decoder layers, visual tokens per image) of a checkpoint of any supported family, from its config alone."""
    return checkpoint_shape(model)


def skip_reason(setting: Setting, num_layers: int, num_visual: int) -> str | None:
    """Why the setting cannot run on this model (its method's `check_fits` ValueError, e.g. an unreachable budget; a
    contrastive decoder composed with RCPP + DRCD), or None."""
    if setting.method is None:
        return None
    method = load_method(setting.method)
    if isinstance(method, ContrastiveDecoder) and setting.config is not None:
        return f"{method.name} is a contrastive decoder and does not compose with RCPP + DRCD"
    try:
        method.check_fits(num_layers, num_visual)
    except ValueError as error:
        return str(error)
    return None


def budget_tokens(budget: int | float | None, num_visual: int) -> int | None:
    """The visual tokens a row's budget resolves to on this model's image, or None (no budget, or larger than the
    image: the row says why it is skipped)."""
    try:
        return None if budget is None else resolve_budget(budget, num_visual)
    except ValueError:
        return None


def budget_cell(row: dict, num_visual: int) -> str:
    """The table's budget column: "-", "22 of 100", or a fraction and its count, "0.2222 = 22 of 100"."""
    budget, tokens = row.get("budget"), row.get("budget_tokens")
    if budget is None:
        return "-"
    if tokens is None:
        return budget_label(budget)
    return f"{tokens} of {num_visual}" if tokens == budget else f"{budget_label(budget)} = {tokens} of {num_visual}"


def split_benchmark(split: str) -> str:
    """The `rcpp_hf.eval.bootstrap.BENCHMARKS` entry of a split: "shapesworld_pope" for each POPE split."""
    return "shapesworld_" + ("pope" if split in POPE_SPLITS else split)


def difference_columns(splits: list[str]) -> list[tuple[str, str]]:
    """(key, header) of the metrics whose differences the table shows: `BENCHMARKS`' metrics of each split."""
    headers = {f"{split}.{metric}": header for split in splits for metric, header in COLUMNS[split]}
    return [(key, headers[key]) for split in splits
            for key in (f"{split}.{metric}" for metric in BENCHMARKS[split_benchmark(split)].metrics)]  # fmt: skip


def add_differences(rows: list[dict], splits: list[str], output_dir: Path, reference: str,
                    level: float = LEVEL) -> None:  # fmt: skip
    """Give each row that ran, but the reference, its `differences` to the reference row (none when that row is
    missing or skipped): {"reference", "level", "resamples", "seed", "metrics": {"<split>.<metric>":
    `Difference.to_dict()`}}, from the answers.jsonl of both runs of each split, paired by id."""
    base = next((row for row in rows if row["setting"] == reference and "skipped" not in row), None)
    for row in rows:
        if "skipped" in row or row["setting"] == reference:
            continue
        metrics = {}
        for split in splits if base is not None else []:
            answers = [RunDirectory(output_dir / name / split).read_answers() for name in (row["setting"], reference)]
            differences = benchmark_differences(split_benchmark(split), *answers, level=level)
            metrics |= {f"{split}.{metric}": difference.to_dict() for metric, difference in differences.items()}
        row["differences"] = {"reference": reference, "level": level, "resamples": RESAMPLES, "seed": SEED,
                              "metrics": metrics}  # fmt: skip


def add_intervals(rows: list[dict], output_dir: Path, level: float = LEVEL) -> None:
    """Give each row that ran its `intervals` of the `FRONTIERS` metrics it measured: {"level", "resamples", "seed",
    "metrics": {"<split>.<metric>": `Interval.to_dict()`}}, each the bootstrap interval of the row's own run of the
    split (its answers.jsonl)."""
    keys = [key for panel in FRONTIERS for key in panel[:2]]
    for row in rows:
        if "skipped" in row:
            continue
        by_split: dict[str, list[str]] = {}
        for key in keys:
            if key in row:
                split, metric = key.split(".", 1)
                by_split.setdefault(split, []).append(metric)
        metrics = {}
        for split, names in by_split.items():
            records = RunDirectory(output_dir / row["setting"] / split).read_answers()
            intervals = benchmark_interval(split_benchmark(split), records, tuple(names), level=level)
            metrics |= {f"{split}.{metric}": interval.to_dict() for metric, interval in intervals.items()}
        row["intervals"] = {"level": level, "resamples": RESAMPLES, "seed": SEED, "metrics": metrics}


def compare(model: str, settings: list[Setting], splits: list[str], seed: int, num_images: int,
            output_dir: str | Path, batch_size: int = 16, progress: bool = True,
            reference: str | None = VANILLA) -> list[dict]:  # fmt: skip
    """Evaluate every setting on every split (a skipped setting keeps its reason); returns one row per setting:
    {"setting", "family", "budget", "config", "method", metric: value}, the costs averaged over its splits, and,
    when a row is named `reference`, "differences" to it (`add_differences`); each row that ran has the "intervals"
    of its frontier metrics (`add_intervals`)."""
    output_dir = Path(output_dir)
    num_layers, num_visual = model_shape(model)
    rows = []
    for setting in settings:
        row = {"setting": setting.name, "family": setting.family, "budget": setting.budget,
               "budget_tokens": budget_tokens(setting.budget, num_visual), "config": setting.config,
               "method": setting.method}  # fmt: skip
        reason = skip_reason(setting, num_layers, num_visual)
        if reason is not None:
            rows.append({**row, "skipped": reason})
            continue
        costs = {key: [] for key in [*(key for key, _ in COST_COLUMNS), "num_heads"]}  # averaged over splits
        for split in splits:
            run = EvalSettings(model=model, split=split, config=setting.config, method=setting.method, seed=seed,
                               num_images=num_images, batch_size=batch_size)  # fmt: skip
            metrics = evaluate(run, output_dir / setting.name / split, progress=progress)
            for metric, _ in COLUMNS[split]:
                if metric in metrics:
                    row[f"{split}.{metric}"] = metrics[metric]
            for key in costs:
                if key in metrics:
                    costs[key].append(metrics[key])
        row.update({key: sum(values) / len(values) for key, values in costs.items() if values})
        rows.append(row)
    if all("skipped" in row for row in rows):  # asked to do nothing: say so rather than write an empty table
        reasons = "; ".join(f"{row['setting']}: {row['skipped']}" for row in rows)
        raise ValueError(f"nothing to compare on this model: {reasons or 'no setting was given'}")
    if reference is not None and any(row["setting"] == reference for row in rows):
        add_differences(rows, splits, output_dir, reference)
    add_intervals(rows, output_dir)
    write_table(rows, splits, output_dir, num_visual, reference)
    plot_quality(rows, output_dir / "quality.png")
    plot_frontier(rows, output_dir / "frontier.png")
    return rows


def difference_table(rows: list[dict], splits: list[str], num_visual: int, reference: str) -> list[str]:
    """The markdown lines of the differences to the reference row (`add_differences`): one cell per metric,
    "+0.012 [-0.020, +0.045] n=50" ("*" after an interval that excludes 0), "-" for a row skipped or without it."""
    columns = difference_columns(splits)
    level = next((row["differences"]["level"] for row in rows if "differences" in row), LEVEL)
    lines = [f"Difference to {reference} (row - {reference}) on the paired items, {level:.0%} paired bootstrap "
             f"interval ({RESAMPLES} resamples, seed {SEED}; * when it excludes 0), n paired questions / MME images / "
             "captions:", "", "| setting | budget | " + " | ".join(h for _, h in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    for row in rows:
        if row["setting"] == reference:
            cells = ["reference"] * len(columns) if "skipped" not in row else ["-"] * len(columns)
        else:
            metrics = row.get("differences", {}).get("metrics", {})
            cells = [Difference.from_dict(metrics[key]).cell() if key in metrics else "-" for key, _ in columns]
        lines.append(f"| {row['setting']} | {budget_cell(row, num_visual)} | " + " | ".join(cells) + " |")
    return lines


def write_table(rows: list[dict], splits: list[str], output_dir: Path, num_visual: int,
                reference: str | None = None) -> None:  # fmt: skip
    """table.json (rows), table.md (one column per metric; then, with a `reference` row, the differences to it:
    `difference_table`) and table.png (CHAIR_I and adversarial accuracy)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = [(f"{split}.{metric}", header) for split in splits for metric, header in COLUMNS[split]] + COST_COLUMNS
    lines = ["| setting | budget | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        budget = budget_cell(row, num_visual)
        if "skipped" in row:
            lines.append(f"| {row['setting']} | {budget} | skipped: {row['skipped']} |")
            continue
        cells = [f"{row[key]:.3f}" if key in row else "-" for key, _ in columns]
        lines.append(f"| {row['setting']} | {budget} | " + " | ".join(cells) + " |")
    if reference is not None and any(row["setting"] == reference for row in rows):
        lines += ["", *difference_table(rows, splits, num_visual, reference)]
    (output_dir / "table.md").write_text("\n".join(lines) + "\n")

    shown = [(key, header) for key, header in (("captions.chair_i", "CHAIR_I (captions)"), ("adversarial.accuracy",
             "POPE adversarial accuracy")) if any(key in row for row in rows)]  # fmt: skip
    if not shown:
        return
    figure, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 0.35 * len(rows) + 1.5), squeeze=False)
    names = [row["setting"] for row in rows]
    for axis, (key, header) in zip(axes[0], shown):
        axis.barh(names, [row.get(key, float("nan")) for row in rows])
        axis.set_xlabel(header)
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(output_dir / "table.png", dpi=110)
    plt.close(figure)


def family_styles(families: list[str]) -> dict[str, dict]:
    """A colour and marker per family, distinct for up to 20 x 7 families (matplotlib's default cycle repeats after
    10 colours, so a comparison of every method would show two methods alike)."""
    colours, markers = plt.get_cmap("tab20").colors, "osD^vPX"
    return {family: {"color": colours[i % len(colours)], "marker": markers[i % len(markers)]}
            for i, family in enumerate(families)}  # fmt: skip


def plot_quality(rows: list[dict], path: Path) -> None:
    """A grid, one row per cost (visual tokens, prefill ms, decode ms) and one column per quality metric measured;
    one line per family through its budgets."""
    quality = [(key, label) for key, label in QUALITY if any(key in row for row in rows)]
    if not quality:
        return
    families = list(dict.fromkeys(row["family"] for row in rows if "skipped" not in row))
    styles = family_styles(families)
    figure, axes = plt.subplots(len(COSTS), len(quality), figsize=(3.6 * len(quality) + 2.2, 3.2 * len(COSTS)),
                                squeeze=False)  # fmt: skip
    for (cost, cost_label), axis_row in zip(COSTS, axes):
        for (metric, label), axis in zip(quality, axis_row):
            for family in families:
                points = sorted((row[cost], row[metric]) for row in rows if row["family"] == family and "skipped" not in row
                                and cost in row and metric in row)  # fmt: skip
                if points:
                    axis.plot(*zip(*points), label=family, markersize=6, **styles[family])
            axis.set(xlabel=cost_label, ylabel=label)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1 - 2.0 / figure.get_figwidth(), 0.98))
    figure.tight_layout(rect=(0, 0, 1 - 2.2 / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# The trade-offs the field reads hallucination methods by: captions and one-word answers.
FRONTIERS = [("captions.recall", "captions.chair_i", "recall", "CHAIR_I"),
             ("adversarial.yes_ratio", "adversarial.f1", "POPE adversarial yes-ratio", "POPE adversarial F1")]


def error_bar(value: float, interval: dict | None) -> list[list[float]] | None:
    """matplotlib's asymmetric error of a point at `value` with `interval` (`Interval.to_dict()`), or None: [[below],
    [above]], each at least 0 (a percentile interval need not hold the point exactly)."""
    if interval is None:
        return None
    return [[max(0.0, value - interval["low"])], [max(0.0, interval["high"] - value)]]


def plot_frontier(rows: list[dict], path: Path, bounds: dict[str, float] | None = None) -> None:
    """CHAIR_I against recall and POPE adversarial F1 against its yes-ratio, for the splits measured: one numbered
    point per result, named in the panel's legend (settings with identical results share a point), with error bars
    of the first such row's `intervals` where it has them (`add_intervals`); `bounds`
    (metric -> value, e.g. a selection rule's recall floor) are drawn as dashed lines on the panels showing them."""
    panels = [panel for panel in FRONTIERS if any(panel[0] in row and panel[1] in row for row in rows)]
    if not panels:
        return
    bounds = bounds or {}
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for (x_key, y_key, x_label, y_label), axis in zip(panels, axes[0]):
        levels = set()
        points: dict[tuple[float, float], list[dict]] = {}
        for row in rows:
            if x_key in row and y_key in row:
                points.setdefault((row[x_key], row[y_key]), []).append(row)
        for number, ((x, y), shared) in enumerate(points.items(), start=1):
            names = [row["setting"] for row in shared]
            label = " = ".join(names) if len(names) <= 3 else f"{names[0]} = {len(names) - 1} other settings"
            colour = f"C{(number - 1) % 10}"
            axis.scatter(x, y, color=colour, marker="os^D"[(number - 1) // 10 % 4], label=f"{number}: {label}")
            intervals = shared[0].get("intervals", {}).get("metrics", {})
            xerr, yerr = (error_bar(value, intervals.get(key)) for value, key in ((x, x_key), (y, y_key)))
            if xerr is not None or yerr is not None:
                axis.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, elinewidth=0.8, capsize=2,
                              alpha=0.6)  # fmt: skip
                levels.add(shared[0]["intervals"].get("level", LEVEL))
            axis.annotate(str(number), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        for key, value in bounds.items():
            if key in (x_key, y_key):
                line = axis.axvline if key == x_key else axis.axhline
                line(value, color="grey", linestyle="--", linewidth=1, label=f"bound: {key} = {value:.3f}")
        axis.set(xlabel=x_label, ylabel=y_label)
        if levels:
            axis.set_title(f"bars: each run's {max(levels):.0%} bootstrap interval", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
