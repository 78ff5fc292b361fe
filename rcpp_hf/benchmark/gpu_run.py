"""The benchmark prepared for a lent GPU, in one command: LLaVA-1.5-7B's exact shape (random weights) in float16,
vanilla, RCPP + DRCD (contrast; contrast and eviction), VCD and every prefill pruner at two budgets, with absolute
prefill and per-token decode times and `torch.cuda.max_memory_allocated`; writes one JSON and one plot.

    python -m rcpp_hf.benchmark.gpu_run --output-dir gpu-bench

Sized for at most 8 minutes on one large GPU (an H200; an estimate: it has not run on one yet): 64 new tokens, 2
repeats; the decoding rows (rcpp, rcpp-evict, vcd) do not depend on the budget and run once, with the first budget.
`--shape tiny --device cpu` runs the same path on a CPU in seconds (the test does, so that the command cannot rot).
`--shape next-7b` measures llava-v1.6-vicuna-7b's anyres layout (2,928 visual tokens) instead; the vision-side
pruners are skipped rows there (they refuse anyres images). Not sized: about five times the prefill tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rcpp_hf.benchmark.suite import BenchmarkSettings, format_report, run_speed_benchmark
from rcpp_hf.methods import METHODS as REGISTRY
from rcpp_hf.methods.budget import published_fraction
from rcpp_hf.methods.prefill_pruner import PrefillPruner

DECODING_ROWS = ("rcpp", "rcpp-evict", "vcd")
BUDGETS = (published_fraction(64), published_fraction(128))  # 64 and 128 of LLaVA-1.5's 576 visual tokens
NEEDS_TRAINED_FILE = ("gan_pruner",)  # its masks come from `rcpp-hf gan-pruner train`; none exists on a fresh machine


def prefill_pruners() -> list[str]:
    """Every registered prefill pruner that runs with its defaults."""
    return [name for name, cls in REGISTRY.items() if issubclass(cls, PrefillPruner) and name not in NEEDS_TRAINED_FILE]


def run_gpu_benchmark(shape: str = "7b", device: str = "cuda", dtype: str = "float16", new_tokens: int = 64,
                      repeats: int = 2, budgets: tuple[float, ...] = BUDGETS) -> dict:  # fmt: skip
    """One `run_speed_benchmark` per budget (the decoding rows with the first only) -> {"runs": [report, ...],
    "seconds": wall time}."""
    started = time.perf_counter()
    runs = []
    for index, budget in enumerate(budgets):
        methods = ("vanilla", *(DECODING_ROWS if index == 0 else ()), *prefill_pruners())
        settings = BenchmarkSettings(shape=shape, methods=methods, budget=budget, new_tokens=new_tokens,
                                     repeats=repeats, device=device, dtype=dtype)  # fmt: skip
        report = run_speed_benchmark(settings)
        print(format_report(report), flush=True)
        runs.append(report)
    return {"runs": runs, "seconds": time.perf_counter() - started}


def plot_gpu_benchmark(result: dict, path: Path) -> None:
    """Per budget: prefill ms and decode ms per token of every row that ran, with its peak memory (on CUDA the
    allocator's `max_memory_allocated`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 1.2 + 0.28 * max(len(r["methods"]) for r in runs) * len(runs)),
                             squeeze=False)  # fmt: skip
    for (prefill_ax, decode_ax), report in zip(axes, runs):
        rows = {m: v for m, v in report["methods"].items() if "skipped" not in v}
        names = list(rows)[::-1]
        prefill = [rows[m]["prefill_s"] * 1e3 for m in names]
        decode = [rows[m]["decode_median_s"] * 1e3 for m in names]
        budget, visual = report["settings"]["budget"], report["environment"]["visual_tokens"]
        prefill_ax.barh(names, prefill, color="tab:blue")
        decode_ax.barh(names, decode, color="tab:orange")
        for ax, values in ((prefill_ax, prefill), (decode_ax, decode)):
            for y, (name, value) in enumerate(zip(names, values)):
                ax.text(value, y, f" {value:.1f}", va="center", fontsize=7)
        for y, name in enumerate(names):
            peak = rows[name]["peak_memory_bytes"] / 2**30
            decode_ax.text(0, y, f" {peak:.1f} GiB", va="center", fontsize=7, color="white")
        prefill_ax.set(xlabel="prefill ms (time to the first token)",
                       title=f"budget {budget:.4f}: {round(budget * visual)} of {visual} visual tokens")
        decode_ax.set(xlabel="decode ms per token (median); peak GiB in white",
                      title=f"{report['settings']['new_tokens']} new tokens")  # fmt: skip
    env = runs[0]["environment"]
    fig.suptitle(f"rcpp_hf on {env['device']}: shape {runs[0]['settings']['shape']}, {runs[0]['settings']['dtype']}, "
                 "batch 1")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="receives gpu-bench.json and gpu-bench.png")
    parser.add_argument("--shape", default="7b", help="7b (default), next-7b (LLaVA-NeXT's anyres layout) or a smaller "
                        "benchmark shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_gpu_benchmark(args.shape, args.device, args.dtype, args.new_tokens, args.repeats)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu-bench.json").write_text(json.dumps(result, indent=1))
    plot_gpu_benchmark(result, args.output_dir / "gpu-bench.png")
    print(f"{result['seconds']:.0f} s; wrote {args.output_dir / 'gpu-bench.json'} and gpu-bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
