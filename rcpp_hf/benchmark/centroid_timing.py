"""Timing of token condensation's centroid selections: FPS (M - 1 sequential max-min steps) against connectivity (one
degree sum and a sort) at N visual tokens, for several M, with the aggregation's cost beside them.

    python -m rcpp_hf.benchmark.centroid_timing [--tokens 576] [--width 4096] [--centroids 36 72 144 288] [--device cuda]

Random features stand in for a layer's keys (the cost does not depend on their values); width 4096 is
LLaVA-1.5-7B's 32 kv heads x 128. Prints the median time of each selection on a precomputed similarity matrix (the
matrix itself, shared by both, is timed once), its growth relative to the smallest M, and the aggregation's time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rcpp_hf.engine.condensation import (
    connectivity_centroids,
    cosine_similarity_matrix,
    cross_attention_aggregate,
    farthest_point_sampling,
)
from rcpp_hf.engine.pruning import NOT_THE_MODELS_HEADS


def median_ms(call, device: torch.device, repeats: int) -> float:
    """Median wall time of `call()` in milliseconds, after one warm-up call (synchronised on CUDA)."""
    times = []
    for index in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_selections(tokens: int, width: int, centroids: list[int], heads: int, device: torch.device,
                    repeats: int) -> list[dict]:  # fmt: skip
    """One row per M: median ms of each selection on the similarity matrix (computed once, `similarity`, shared by
    both) and of the aggregation."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, tokens, width, generator=generator).to(device)
    similarity = cosine_similarity_matrix(features)
    similarity_ms = median_ms(lambda: cosine_similarity_matrix(features), device, repeats)
    rows = []
    for count in centroids:
        row = {"M": count, "similarity": similarity_ms}
        row["fps"] = median_ms(lambda: farthest_point_sampling(similarity, count), device, repeats)
        row["connectivity"] = median_ms(lambda: connectivity_centroids(similarity, count), device, repeats)
        chosen = connectivity_centroids(similarity, count)
        row["aggregate"] = median_ms(lambda: cross_attention_aggregate(features, features, chosen, heads, 0.1), device,
                                     repeats)  # fmt: skip
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rcpp_hf.benchmark.centroid_timing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32, help="heads the timed cross-attention aggregation splits "
                        f"--width into (random features: {NOT_THE_MODELS_HEADS}; default: 32, LLaVA-1.5-7B's)")
    parser.add_argument("--centroids", type=int, nargs="+", default=[36, 72, 144, 288])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    rows = time_selections(args.tokens, args.width, args.centroids, args.heads, device, args.repeats)
    print(f"N = {args.tokens} tokens, width {args.width}, {args.heads} heads, {device} ({torch.get_num_threads()} "
          f"threads on CPU); median of {args.repeats}; growth is relative to M = {rows[0]['M']}")
    print(f"similarity matrix: {rows[0]['similarity']:.3f} ms (both strategies)")
    print(f"{'M':>5}  {'fps ms':>9} {'growth':>7}  {'connectivity ms':>15} {'growth':>7}  {'fps / conn':>10}  "
          f"{'aggregate ms':>12}")  # fmt: skip
    for row in rows:
        print(f"{row['M']:>5}  {row['fps']:>9.3f} {row['fps'] / rows[0]['fps']:>6.2f}x  {row['connectivity']:>15.3f} "
              f"{row['connectivity'] / rows[0]['connectivity']:>6.2f}x  {row['fps'] / row['connectivity']:>9.2f}x  "
              f"{row['aggregate']:>12.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
