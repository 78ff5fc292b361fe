"""`rcpp-hf shapesworld compare` and `sweep`: decoding settings side by side on ShapesWorld.

`compare` evaluates each setting (vanilla greedy, or an RCPP YAML preset) on each split, each run in
its own resumable folder (`evaluate.py`), and writes `table.md`, `table.json` and `table.png`.

`sweep` is `compare` over a one-factor-at-a-time grid around the library defaults (gamma, tau,
lambda_end, keep-ratio schedule) on the captions split, meant for the validation world; it also
names the setting it would choose: the lowest CHAIR_I among settings whose recall is at least
vanilla's minus 0.02. POPE is left out of the sweep on purpose: a POPE answer is the first generated
token, which RCPP decodes from the prefill without contrast or eviction, so every setting answers
POPE exactly as vanilla does (the final table shows it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from rcpp_hf.config import RCPP_DEFAULTS  # noqa: E402
from rcpp_hf.shapesworld.evaluate import SPLITS, EvalSettings, evaluate  # noqa: E402
from rcpp_hf.shapesworld.world import VALIDATION_SEED  # noqa: E402

VANILLA = "vanilla"
COLUMNS = {  # split -> (metric, header)
    "random": [("accuracy", "rand acc"), ("f1", "rand F1"), ("yes_ratio", "rand yes")],
    "popular": [("accuracy", "pop acc"), ("f1", "pop F1"), ("yes_ratio", "pop yes")],
    "adversarial": [("accuracy", "adv acc"), ("f1", "adv F1"), ("yes_ratio", "adv yes")],
    "mme": [("existence_acc", "MME exist"), ("count_acc", "MME count"), ("position_acc", "MME pos"),
            ("color_acc", "MME color"), ("score", "MME score")],  # fmt: skip
    "captions": [("chair_s", "CHAIR_S"), ("chair_i", "CHAIR_I"), ("recall", "recall"), ("length", "len"),
                 ("partner_hallucination", "partner"), ("visual_kept", "KV kept")],  # fmt: skip
}

# One knob at a time around the defaults; keep-ratio schedules as (end, schedule).
SWEEP_GRID = {
    "gamma": [0.8, 0.95],
    "tau": [-0.05, 0.05],
    "lambda_end": [0.0, 0.25, 1.0],
    "keep_ratio_end": [1.0, 0.25],
}


def sweep_configs(folder: Path, max_new_tokens: int = 64) -> list[str]:
    """Write the sweep's YAML presets into `folder`; returns [VANILLA, default, each variation] as names/paths."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {**RCPP_DEFAULTS, "scoring_layers": list(RCPP_DEFAULTS["scoring_layers"]),
            "max_new_tokens": max_new_tokens, "do_sample": False}  # fmt: skip
    variations = [("default", {})] + [(f"{key}={value}", {key: value}) for key, values in SWEEP_GRID.items() for value in values]
    paths = [VANILLA]
    for name, change in variations:
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**base, **change}, sort_keys=False))
        paths.append(str(path))
    return paths


def setting_name(config: str) -> str:
    return VANILLA if config == VANILLA else Path(config).stem


def compare(model: str, configs: list[str], splits: list[str], seed: int, num_images: int, output_dir: str | Path,
            batch_size: int = 16, progress: bool = True) -> list[dict]:  # fmt: skip
    """Evaluate every config on every split; returns one row per config: {"setting": name, metric: value}."""
    output_dir = Path(output_dir)
    rows = []
    for config in configs:
        row = {"setting": setting_name(config), "config": config}
        for split in splits:
            settings = EvalSettings(model=model, split=split, config=None if config == VANILLA else config, seed=seed,
                                    num_images=num_images, batch_size=batch_size)  # fmt: skip
            metrics = evaluate(settings, output_dir / row["setting"] / split, progress=progress)
            for metric, _ in COLUMNS[split]:
                if metric in metrics:
                    row[f"{split}.{metric}"] = metrics[metric]
        rows.append(row)
    write_table(rows, splits, output_dir)
    return rows


def write_table(rows: list[dict], splits: list[str], output_dir: Path) -> None:
    """table.json (rows), table.md (one column per metric) and table.png (CHAIR_I and adversarial accuracy)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = [(f"{split}.{metric}", header) for split in splits for metric, header in COLUMNS[split]]
    lines = ["| setting | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{row[key]:.3f}" if key in row else "-" for key, _ in columns]
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
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


def choose(rows: list[dict]) -> dict:
    """The sweep's choice (see the module docstring); vanilla when no RCPP setting qualifies."""
    vanilla = next(row for row in rows if row["setting"] == VANILLA)
    qualified = [row for row in rows if row["captions.recall"] >= vanilla["captions.recall"] - 0.02]
    return min(qualified, key=lambda row: (row["captions.chair_i"], row["setting"] != VANILLA))


def add_parsers(subcommands: argparse._SubParsersAction) -> None:
    for name in ("compare", "sweep"):
        parser = subcommands.add_parser(name, help=f"{name} decoding settings on ShapesWorld", description=__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded ShapesWorld model)")
        if name == "compare":
            parser.add_argument("--configs", nargs="+", required=True, help=f"'{VANILLA}' or RCPP YAML presets")
            parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
        parser.add_argument("--seed", type=int, default=VALIDATION_SEED, help=f"world seed (validation: {VALIDATION_SEED})")
        parser.add_argument("--num-images", type=int, default=50)
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--output-dir", required=True)
        parser.set_defaults(func=_run_compare if name == "compare" else _run_sweep)


def _model(args: argparse.Namespace) -> str:
    from rcpp_hf.default_model import default_model_path

    return str(args.model or default_model_path())


def _run_compare(args: argparse.Namespace) -> int:
    compare(_model(args), args.configs, args.splits, args.seed, args.num_images, args.output_dir, args.batch_size)
    print((Path(args.output_dir) / "table.md").read_text())
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    configs = sweep_configs(Path(args.output_dir) / "configs")
    rows = compare(_model(args), configs, ["captions"], args.seed, args.num_images, args.output_dir, args.batch_size)
    chosen = choose(rows)
    (Path(args.output_dir) / "chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    print((Path(args.output_dir) / "table.md").read_text())
    print(f"chosen: {chosen['setting']} ({chosen['config']})")
    return 0
