"""Measured prefill ratio of every prefill pruner against what the FLOPs model predicts, from `rcpp-hf bench
--output` reports: one panel against the FLOPs ratio (the model's, with the pruner's own stage work), one against the
cost ratio (FLOPs and weight reads, `benchmark/flops.py`), one marker per report (batch size and budget).

    python -m rcpp_hf.benchmark.prefill_plot bench-b1-128.json bench-b8-128.json ... --output prefill.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rcpp_hf.benchmark.suite import PREFILL_FLOPS_SLACK, measured

MARKERS = "osD^vP*X"


def plot_prefill_against_flops(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True)
    highest = 0.0
    for index, report in enumerate(reports):
        settings, env = report["settings"], report["environment"]
        rows = {m: v for m, v in measured(report["methods"]).items() if "prefill_flops_ratio" in v}
        label = (f"batch {settings['batch_size']}, budget {round(settings['budget'] * env['visual_tokens'])} of "
                 f"{env['visual_tokens']}" if isinstance(settings["budget"], float) else
                 f"batch {settings['batch_size']}, budget {settings['budget']}")  # fmt: skip
        for ax, predicted in zip(axes, ("prefill_flops_ratio", "prefill_cost_ratio")):
            xs = [rows[m][predicted] for m in rows]
            ys = [rows[m]["prefill_ratio"] for m in rows]
            ax.scatter(xs, ys, marker=MARKERS[index % len(MARKERS)], label=label, alpha=0.8)
            highest = max([highest, *xs, *ys])
    titles = ("against the FLOPs ratio (model + scoring)", "against the cost ratio (+ weight reads)")
    for ax, title in zip(axes, titles):
        line = [0, highest * 1.05]
        ax.plot(line, line, color="black", linewidth=1, label="measured = predicted")
        ax.plot(line, [v * PREFILL_FLOPS_SLACK for v in line], color="gray", linestyle="--", linewidth=1,
                label=f"{PREFILL_FLOPS_SLACK:.2f} x predicted")  # fmt: skip
        ax.set(xlim=(0, line[1]), ylim=(0, line[1]), xlabel="predicted prefill ratio to vanilla", title=title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("measured prefill ratio to vanilla (time to the first token)")
    axes[1].legend(fontsize=8, loc="upper left")
    first = reports[0]
    fig.suptitle(f"prefill pruners on {first['settings']['model'] or first['settings']['shape']} "
                 f"({first['environment']['device']}, {first['environment']['threads']} threads)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="`rcpp-hf bench --output` JSON files")
    parser.add_argument("--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    plot_prefill_against_flops([json.loads(path.read_text()) for path in args.reports], args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
