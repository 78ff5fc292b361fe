"""Where a prefill's time goes, per stage: the vision tower, the decoder layers, the pruning stages, the
language-model head and the rest of the `generate` call, one prefill (one new token) per run, rows interleaved;
and how fast a decoder layer's MLP products run with the numbers of rows a pruned prefill gives them.

    python -m rcpp_hf.benchmark.prefill_profile --shape small --methods vanilla,fastv,visionzip --budget 128

Times are medians over `--repeats` after one warm-up round; "rest" is the call's time minus the stages timed
(generate's set-up, embeddings, masks, rotary tables, the first token's choice).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from unittest import mock

import torch

from rcpp_hf.benchmark.flops import synchronize
from rcpp_hf.benchmark.model_sizes import load_benchmark_model
from rcpp_hf.benchmark.suite import BenchmarkSettings, benchmark_inputs, image_side, method_generation_config
from rcpp_hf.engine.pruning import PrefillPruningTap

STAGES = ("vision tower", "decoder layers", "pruning stages", "head")


@contextmanager
def timing_stages(model):
    """While active, the yielded dict sums seconds per stage of `STAGES` (forward hooks on the vision tower, each
    decoder layer and the head; the pruning stages inside `PrefillPruningTap.before_layer`)."""
    totals: dict[str, float] = defaultdict(float)
    device = model.device
    started: dict[str, float] = {}

    def hooks(module, stage):
        def before(*_):
            synchronize(device)
            started[stage] = time.perf_counter()

        def after(*_):
            synchronize(device)
            totals[stage] += time.perf_counter() - started[stage]

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    handles = hooks(model.model.vision_tower, "vision tower") + hooks(model.lm_head, "head")
    for layer in model.model.language_model.layers:
        handles += hooks(layer, "decoder layers")
    before_layer = PrefillPruningTap.before_layer

    def timed(tap, *args):
        start = time.perf_counter()
        changed = before_layer(tap, *args)
        synchronize(device)
        totals["pruning stages"] += time.perf_counter() - start
        return changed

    try:
        with mock.patch.object(PrefillPruningTap, "before_layer", timed):
            yield totals
    finally:
        for handle in handles:
            handle.remove()


def profile_prefill(model, processor, settings: BenchmarkSettings) -> dict[str, dict[str, float]]:
    """{method: {"prefill": s, stage: s, ..., "rest": s}}, medians over `settings.repeats` one-token generations."""
    inputs = benchmark_inputs(processor, settings, settings.device, getattr(torch, settings.dtype),
                              image_side(model.config))
    configs = {}
    for method in settings.methods:
        configs[method] = method_generation_config(method, settings, tau=-1.0)
        configs[method].max_new_tokens = configs[method].min_new_tokens = 1
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for repeat in range(settings.repeats + 1):  # round 0 is the warm-up
        for method in settings.methods:
            with timing_stages(model) as stages:
                synchronize(model.device)
                start = time.perf_counter()
                model.generate(**inputs, generation_config=configs[method])
                synchronize(model.device)
                total = time.perf_counter() - start
            if repeat > 0:
                runs[method].append({"prefill": total, **{s: stages[s] for s in STAGES},
                                     "rest": total - sum(stages.values())})  # fmt: skip
    return {m: {key: statistics.median(run[key] for run in runs[m]) for key in runs[m][0]} for m in settings.methods}


def mlp_speed(model, rows: tuple[int, ...], repeats: int = 20) -> list[tuple[int, float, float]]:
    """(rows, ms, GFLOP/s) of one decoder layer's MLP (gate, up, down products, its own weights) per row count."""
    mlp = model.model.language_model.layers[0].mlp
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    speeds = []
    for count in rows:
        inputs = [torch.randn(count, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
        times = []
        for _ in range(repeats + 2):
            synchronize(model.device)
            start = time.perf_counter()
            for x, weight in zip(inputs, weights):
                torch.nn.functional.linear(x, weight)
            synchronize(model.device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[2:])
        speeds.append((count, seconds * 1e3, 2 * count * sum(w.numel() for w in weights) / seconds / 1e9))
    return speeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--methods", default="vanilla,fastv,pdrop,visionzip")
    parser.add_argument("--budget", type=lambda text: int(text) if text.isdigit() else float(text),
                        default=BenchmarkSettings.budget, help="a count of the image's tokens or a fraction of it "
                        "(BenchmarkSettings checks it)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rows", type=int, nargs="+", default=[84, 148, 212, 596], help="MLP row counts to time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchmarkSettings(shape=args.shape, methods=tuple(args.methods.split(",")), budget=args.budget,
                                 batch_size=args.batch_size, repeats=args.repeats)  # fmt: skip
    model, processor = load_benchmark_model(settings.shape, None, settings.device, getattr(torch, settings.dtype))
    profile = profile_prefill(model, processor, settings)
    columns = ["prefill", *STAGES, "rest"]
    print(f"shape {args.shape}, batch {args.batch_size}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats} repeats, ms")  # fmt: skip
    print(f"{'method':<17}" + "".join(f"{c:>16}" for c in columns))
    for method, stages in profile.items():
        print(f"{method:<17}" + "".join(f"{stages[c] * 1e3:>16.1f}" for c in columns))
    print("\none decoder layer's MLP products (gate, up, down):")
    for rows, ms, speed in mlp_speed(model, tuple(args.rows)):
        print(f"  {rows:>5} rows  {ms:7.2f} ms  {speed:6.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
