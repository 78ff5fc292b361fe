"""Hard pruning against token condensation on ShapesWorld: the MME experiment of YangXu-03/Himap-based's token
condensation (hard pruning, FPS and connectivity at a target token count, condensation layers 5 to 15 of 32), with a
POPE split beside it.

    python experiments/condensation.py --target-tokens 0.1111 0.2222 --output-dir runs/condensation [--model FOLDER]

Hard pruning (HiMAP's text-stage cut), condensation with FPS centroids and condensation with connectivity centroids,
each at one stage before layer L keeping T visual tokens, over target tokens T (budgets: a count of the model's image
or a fraction of it, `rcpp_hf/methods/budget.py`; default 64 / 128 of 576 as fractions, 0.1111 / 0.2222) x layers L
(the model's own indices; default 5 / 10 / 15 of 32, scaled by depth), with vanilla
beside them; on the MME-style ShapesWorld set (existence, count, position, color and their total) and one POPE split.
The stage is HiMAP's first (`HiMAP(txt_layer=L, txt_rank=T, image_stage=False)`): that experiment sweeps one
condensation layer, and a second stage would make the layers of different rows incomparable.

Every cell is a row of `compare` (its own resumable folder, answers appended as they come, so an
interrupted run resumes where it stopped); this script writes `condensation.json` (one record per cell, with the
gain over hard pruning), `condensation.md` and `condensation.png` (MME total and POPE F1 against L, the four
subtasks, the gain over hard pruning) next to `compare`'s table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rcpp_hf.cli.errors import run_script  # noqa: E402
from rcpp_hf.cli.options import BUDGET_HELP, LAYER_HELP, budget_argument, model_folder  # noqa: E402
from rcpp_hf.cli.shapesworld import add_comparison_arguments  # noqa: E402
from rcpp_hf.engine.pruning import scale_layer  # noqa: E402
from rcpp_hf.methods import HiMAP  # noqa: E402
from rcpp_hf.methods.budget import budget_label, published_fraction  # noqa: E402
from rcpp_hf.shapesworld.compare import VANILLA, Setting, compare, model_shape  # noqa: E402
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS  # noqa: E402

VARIANTS = ("hard", "fps", "connectivity")
TARGET_TOKENS = (published_fraction(64), published_fraction(128))  # 64 / 128 of 576
REFERENCE_CONDENSATION_LAYERS = (5, 10, 15)  # of 32, within that experiment's layers 5 to 15
SUBTASKS = ("existence", "count", "position", "color")


def variant_method(variant: str, layer: int, tokens: int | float) -> HiMAP:
    """One cell's method: HiMAP's text stage alone, cut ("hard") or condensed by the named strategy."""
    if variant == "hard":
        return HiMAP(txt_layer=layer, txt_rank=tokens, image_stage=False)
    return HiMAP(txt_layer=layer, txt_rank=tokens, image_stage=False, use_token_condensation=True,
                 condensation_strategy=variant)  # fmt: skip


def default_layers(num_layers: int) -> tuple[int, ...]:
    return tuple(dict.fromkeys(scale_layer(layer, num_layers) for layer in REFERENCE_CONDENSATION_LAYERS))


def experiment_settings(targets: tuple[int | float, ...], layers: tuple[int, ...],
                        variants: tuple[str, ...] = VARIANTS) -> list[Setting]:  # fmt: skip
    """Vanilla, then per target (a budget) and layer, one row per variant, named `<variant>-t<target>-l<layer>`
    (the target as given, `budget_label`)."""
    settings = [Setting(VANILLA, VANILLA)]
    for target in targets:
        for layer in layers:
            for variant in variants:
                method = variant_method(variant, layer, target)
                name = f"{variant}-t{budget_label(target)}-l{layer}"
                settings.append(Setting(name, variant, method=method.to_dict(), budget=target))
    return settings


def cell_records(rows: list[dict], pope_split: str) -> list[dict]:
    """One record per cell: variant, target, layer, the four subtask accuracies, the MME total, POPE F1 and
    accuracy, and the gain of each over hard pruning at the same target and layer (vanilla: layer None)."""
    metrics = {**{f"{s}_acc": f"mme.{s}_acc" for s in SUBTASKS}, "mme_score": "mme.score",
               "pope_f1": f"{pope_split}.f1", "pope_accuracy": f"{pope_split}.accuracy"}  # fmt: skip
    records = []
    for row in rows:
        method = row.get("method") or {}
        record = {"setting": row["setting"], "variant": row["family"], "target": row["budget"],
                  "layer": method.get("txt_layer"), "tokens": row.get("budget_tokens")}  # fmt: skip
        if "skipped" in row:
            records.append({**record, "skipped": row["skipped"]})
            continue
        records.append({**record, **{name: row[key] for name, key in metrics.items() if key in row}})
    hard = {(r["target"], r["layer"]): r for r in records if r["variant"] == "hard" and "skipped" not in r}
    for record in records:
        reference = hard.get((record["target"], record["layer"]))
        if record["variant"] in VARIANTS and reference is not None and "skipped" not in record:
            for name in ("mme_score", "pope_f1"):
                if name in record and name in reference:
                    record[f"{name}_gain"] = record[name] - reference[name]
    return records


def write_report(records: list[dict], output_dir: Path) -> None:
    """condensation.json / .md and condensation.png."""
    (output_dir / "condensation.json").write_text(json.dumps(records, indent=1) + "\n")
    columns = [*(f"{s}_acc" for s in SUBTASKS), "mme_score", "mme_score_gain", "pope_f1", "pope_f1_gain"]
    lines = ["| variant | target | layer | tokens | " + " | ".join(columns) + " |", "|---" * (len(columns) + 4) + "|"]
    for r in records:
        target = "-" if r["target"] is None else budget_label(r["target"])
        head = f"| {r['variant']} | {target} | {r['layer'] if r['layer'] is not None else '-'} | " \
               f"{r['tokens'] or '-'} | "  # fmt: skip
        if "skipped" in r:
            lines.append(head + f"skipped: {r['skipped']} |")
            continue
        lines.append(head + " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in columns) + " |")
    (output_dir / "condensation.md").write_text("\n".join(lines) + "\n")
    plot_experiment(records, output_dir / "condensation.png")


def plot_experiment(records: list[dict], path: Path) -> None:
    """Top row: MME total, POPE F1 and the gains over hard pruning against the layer; bottom row: the subtasks.
    One line per (variant, target); vanilla as a dashed line."""
    cells = [r for r in records if r["layer"] is not None and "skipped" not in r]
    vanilla = next((r for r in records if r["variant"] == VANILLA and "skipped" not in r), {})
    panels = [[("mme_score", "MME total (of 800)"), ("pope_f1", "POPE F1"), ("mme_score_gain", "MME gain over hard"),
               ("pope_f1_gain", "POPE F1 gain over hard")],
              [(f"{s}_acc", f"MME {s} accuracy") for s in SUBTASKS]]  # fmt: skip
    figure, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    lines = list(dict.fromkeys((r["variant"], r["target"]) for r in cells))
    colours = {line: f"C{i % 10}" for i, line in enumerate(lines)}  # one colour per line in every panel
    for panel_row, axis_row in zip(panels, axes):
        for (key, label), axis in zip(panel_row, axis_row):
            for variant, target in lines:
                if key.endswith("_gain") and variant == "hard":
                    continue
                points = sorted((r["layer"], r[key]) for r in cells if (r["variant"], r["target"]) == (variant, target)
                                and key in r)  # fmt: skip
                if points:
                    axis.plot(*zip(*points), marker="o", color=colours[variant, target],
                              label=f"{variant} T={budget_label(target)}")
            if key in vanilla:
                axis.axhline(vanilla[key], color="gray", linestyle="--", label="vanilla")
            if key.endswith("_gain"):
                axis.axhline(0.0, color="black", linewidth=0.8)
            axis.set(xlabel="condensation layer", ylabel=label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[0][2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python experiments/condensation.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--target-tokens", type=budget_argument, nargs="+", default=list(TARGET_TOKENS),
                        help=f"visual tokens kept, budgets: {BUDGET_HELP} (default: 0.1111 0.2222)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help=f"condensation layers (HiMAP's text "
                        f"stage), {LAYER_HELP}, used as given (default: 5 / 10 / 15 of 32, scaled to this model's "
                        "depth)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--pope-split", default="adversarial", choices=POPE_SPLITS)
    add_comparison_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every cell through `compare` on the MME-style set and the POPE split; write and print the
    report."""
    args = build_parser().parse_args(argv)
    model = model_folder(args.model)
    num_layers, _ = model_shape(model)
    layers = tuple(args.layers) if args.layers else default_layers(num_layers)
    settings = experiment_settings(tuple(args.target_tokens), layers, tuple(args.variants))
    rows = compare(model, settings, ["mme", args.pope_split], args.seed, args.num_images, args.output_dir,
                   args.batch_size)  # fmt: skip
    write_report(cell_records(rows, args.pope_split), Path(args.output_dir))
    print((Path(args.output_dir) / "condensation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "python experiments/condensation.py"))
