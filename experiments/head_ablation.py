"""The head-strategy ablation of FastV + FinePruner (EasonAI-5589/LLaVA-FinePruner-Head) on ShapesWorld.

    python experiments/head_ablation.py --seed 2 --budgets 0.3333 --output-dir runs/heads [--model FOLDER]

FastV + FinePruner for every head strategy (the nine fixed ones and the dynamic consensus-diversity selection) x
number of heads H (this model's own head counts; by default 8 / 16 / 24 / 32 of LLaVA-1.5's 32, scaled to the model's
heads) x budget (a count of the model's image or a fraction of it, `rcpp_hf/methods/budget.py`; by default 64 / 128 /
192 of 576 as fractions, 0.1111 / 0.2222 / 0.3333), with FastV (all heads, averaged) beside each budget; POPE on one
split. Rows are named `fastv-<budget>`, `fp-<strategy>-h<H>-<budget>` and `fp-consensus_diversity-<budget>`, the budget
as given (`budget_label`). Every cell is a row of `compare`
(its own resumable run folder); the ablation writes `ablation.md`, `ablation.json` and `ablation.png` (a heat map of
F1 per budget: strategies x H) next to `compare`'s table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from transformers import AutoConfig  # noqa: E402

from rcpp_hf.cli.errors import run_script  # noqa: E402
from rcpp_hf.cli.options import BUDGET_HELP, OWN_HEADS, budget_argument, model_folder  # noqa: E402
from rcpp_hf.cli.shapesworld import add_comparison_arguments  # noqa: E402
from rcpp_hf.methods import FastV, FastVFinePruner  # noqa: E402
from rcpp_hf.methods.budget import budget_label  # noqa: E402
from rcpp_hf.methods.fastv_finepruner import DYNAMIC  # noqa: E402
from rcpp_hf.methods.head_selection import HEAD_STRATEGIES  # noqa: E402
from rcpp_hf.shapesworld.compare import BUDGETS, Setting, compare  # noqa: E402
from rcpp_hf.shapesworld.pope_sets import POPE_SPLITS  # noqa: E402

STUDY_HEADS = (8, 16, 24, 32)  # of LLaVA-1.5-7B's 32 heads, the H of LLaVA-FinePruner-Head's ablation
REFERENCE_HEADS = 32


def scale_heads(heads: int, num_heads: int) -> int:
    """A head count stated for LLaVA-1.5's 32 heads, at the same fraction of `num_heads` (at least 1)."""
    return max(1, round(heads * num_heads / REFERENCE_HEADS))


def study_heads(num_heads: int) -> tuple[int, ...]:
    """The study's H (8 / 16 / 24 / 32 of 32) on a model of `num_heads` heads, duplicates merged."""
    return tuple(dict.fromkeys(scale_heads(h, num_heads) for h in STUDY_HEADS))


def ablation_settings(strategies: list[str], heads: tuple[int, ...], budgets: tuple[int | float, ...],
                      num_heads: int) -> list[Setting]:  # fmt: skip
    """FastV per budget, then every (strategy, H) per budget; the dynamic strategy once per budget (it picks H).
    `heads` are this model's own head counts, each in [1, num_heads]; `budgets` follow the budget rule."""
    if any(not 1 <= h <= num_heads for h in heads):
        raise ValueError(f"--heads {' '.join(map(str, heads))}: head counts of this model must lie in [1, {num_heads}]")
    settings = []
    for budget in budgets:
        label = budget_label(budget)
        settings.append(Setting(f"fastv-{label}", "fastv", method=FastV(budget=budget).to_dict(), budget=budget))
        for strategy in strategies:
            for h in dict.fromkeys([None] if strategy == DYNAMIC else heads):
                method = FastVFinePruner(budget=budget, head_strategy=strategy, num_heads=h or 1)
                name = f"fp-{strategy}-{label}" if h is None else f"fp-{strategy}-h{h}-{label}"
                settings.append(Setting(name, f"fastv_finepruner:{strategy}", method=method.to_dict(), budget=budget))
    return settings


def ablation_table(rows: list[dict], split: str, output_dir: Path) -> None:
    """ablation.json / .md (F1 per strategy x H, one block per budget; heads chosen for the dynamic strategy) and
    ablation.png (heat maps)."""
    metric = f"{split}.f1"
    done = [row for row in rows if "skipped" not in row]
    budgets = sorted({row["budget"] for row in done})
    cells = {}
    for row in done:
        method = row["method"]
        strategy = method.get("head_strategy", "fastv (all heads)") if method["method"] != "fastv" else "fastv (all heads)"
        heads = "all" if method["method"] == "fastv" else ("dyn" if strategy == DYNAMIC else method["num_heads"])
        cells[(row["budget"], strategy, heads)] = (row.get(metric), row.get("num_heads"))
    (output_dir / "ablation.json").write_text(json.dumps(
        [{"budget": b, "strategy": s, "heads": h, "f1": v[0], "heads_chosen": v[1]} for (b, s, h), v in cells.items()],
        indent=1) + "\n")  # fmt: skip
    strategies = list(dict.fromkeys(s for (_, s, _) in cells))
    head_columns = sorted({h for (_, _, h) in cells if isinstance(h, int)})
    lines = []
    for budget in budgets:
        lines += [f"### budget {budget_label(budget)} — POPE {split} F1", "",
                  "| strategy | " + " | ".join(f"H={h}" for h in head_columns) + " | dynamic (heads chosen) | all heads |",
                  "|---" * (len(head_columns) + 3) + "|"]  # fmt: skip
        for strategy in strategies:
            values = [cells.get((budget, strategy, h), (None, None))[0] for h in head_columns]
            dynamic = cells.get((budget, strategy, "dyn"))
            whole = cells.get((budget, strategy, "all"))
            line = [f"{v:.3f}" if v is not None else "" for v in values]
            line.append(f"{dynamic[0]:.3f} ({dynamic[1]:.1f})" if dynamic and dynamic[0] is not None else "")
            line.append(f"{whole[0]:.3f}" if whole and whole[0] is not None else "")
            lines.append(f"| {strategy} | " + " | ".join(line) + " |")
        lines.append("")
    (output_dir / "ablation.md").write_text("\n".join(lines))

    fixed = [s for s in strategies if s in HEAD_STRATEGIES]
    if not (budgets and fixed and head_columns):
        return
    figure, axes = plt.subplots(1, len(budgets), figsize=(2.2 + 1.1 * len(head_columns) * len(budgets), 4.5),
                                squeeze=False)  # fmt: skip
    for axis, budget in zip(axes[0], budgets):
        grid = [[cells.get((budget, s, h), (float("nan"),))[0] or float("nan") for h in head_columns] for s in fixed]
        image = axis.imshow(grid, cmap="viridis", aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="white")
        axis.set(xticks=range(len(head_columns)), xticklabels=[f"H={h}" for h in head_columns],
                 yticks=range(len(fixed)), yticklabels=fixed, title=f"budget {budget_label(budget)}")  # fmt: skip
        figure.colorbar(image, ax=axis, shrink=0.8, label=f"POPE {split} F1")
    figure.tight_layout()
    figure.savefig(output_dir / "ablation.png", dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python experiments/head_ablation.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--strategies", nargs="+", default=[*HEAD_STRATEGIES, DYNAMIC],
                        choices=[*HEAD_STRATEGIES, DYNAMIC])  # fmt: skip
    parser.add_argument("--heads", type=int, nargs="+", default=None, help=f"H, {OWN_HEADS}, each from 1 to "
                        "its number of heads (default: 8 / 16 / 24 / 32 of LLaVA-1.5's 32, scaled to this model's heads)")
    parser.add_argument("--budgets", type=budget_argument, nargs="+", default=list(BUDGETS),
                        help=f"FastV budgets: {BUDGET_HELP} (default: 0.1111 0.2222 0.3333)")
    parser.add_argument("--split", default="adversarial", choices=POPE_SPLITS)
    add_comparison_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) every cell through `compare`; write and print the ablation table."""
    args = build_parser().parse_args(argv)
    model = model_folder(args.model)
    num_heads = AutoConfig.from_pretrained(model).text_config.num_attention_heads
    heads = tuple(args.heads) if args.heads else study_heads(num_heads)
    settings = ablation_settings(args.strategies, heads, tuple(args.budgets), num_heads)
    rows = compare(model, settings, [args.split], args.seed, args.num_images, args.output_dir, args.batch_size)
    ablation_table(rows, args.split, Path(args.output_dir))
    print((Path(args.output_dir) / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "python experiments/head_ablation.py"))
