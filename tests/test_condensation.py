"""Token condensation's pure functions (rcpp_hf.engine.condensation) against brute force and hand-computed values."""

import math

import pytest
import torch

from rcpp_hf.engine.condensation import (
    condense,
    connectivity_centroids,
    cosine_similarity_matrix,
    cross_attention_aggregate,
    farthest_point_sampling,
    select_centroids,
)


def hand_features(count=7, width=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, count, width, generator=generator)


def brute_cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_similarity_matrix_is_the_pairwise_cosine():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    half = 1 / math.sqrt(2)
    expected = torch.tensor([[[1.0, 0.0, half], [0.0, 1.0, half], [half, half, 1.0]]])
    torch.testing.assert_close(cosine_similarity_matrix(features), expected)


def test_fps_is_greedy_max_min_from_the_most_isolated_token():
    features = hand_features()
    chosen = farthest_point_sampling(cosine_similarity_matrix(features), 5)
    for row in range(2):
        points = features[row].tolist()
        distance = [[1 - brute_cosine(a, b) for b in points] for a in points]
        nearest_other = [min(d for j, d in enumerate(line) if j != i) for i, line in enumerate(distance)]
        picks = [max(range(len(points)), key=lambda i: nearest_other[i])]
        while len(picks) < 5:
            gaps = [min(distance[i][p] for p in picks) if i not in picks else -1 for i in range(len(points))]
            picks.append(max(range(len(points)), key=lambda i: gaps[i]))
        assert chosen[row].tolist() == picks
        # The max-min property: every token left out is no farther from the chosen set than the last one chosen is
        # from the ones before it.
        last_gap = min(distance[picks[-1]][p] for p in picks[:-1])
        assert all(min(distance[i][p] for p in picks) <= last_gap + 1e-6 for i in range(len(points)) if i not in picks)


def test_fps_on_a_hand_layout():
    # Directions at 0, 5, 90 and 180 degrees. Nearest-other distances 1 - cos: 0.004, 0.004, 0.91, 1, so 180 starts;
    # then 0 (distance 2 from it, 5 is at 1 + cos 5); then 90 (distance 1 from both, 5 is 0.004 from 0).
    angles = torch.tensor([0.0, 5.0, 90.0, 180.0]) * math.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    assert farthest_point_sampling(cosine_similarity_matrix(features), 3).tolist() == [[3, 0, 2]]


def test_fps_random_start_is_seeded():
    similarity = cosine_similarity_matrix(hand_features(count=9))
    runs = [farthest_point_sampling(similarity, 4, "random", torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    starts = {tuple(farthest_point_sampling(similarity, 1, "random", torch.Generator().manual_seed(s))[:, 0].tolist())
              for s in range(6)}  # fmt: skip
    assert len(starts) > 1


def test_connectivity_keeps_the_highest_degrees():
    features = hand_features(count=8, width=4, seed=1)
    chosen = connectivity_centroids(cosine_similarity_matrix(features), 3)
    for row in range(2):
        points = features[row].tolist()
        degree = [sum(brute_cosine(a, b) for j, b in enumerate(points) if j != i) for i, a in enumerate(points)]
        assert chosen[row].tolist() == sorted(range(len(points)), key=lambda i: -degree[i])[:3]


def test_aggregation_matches_a_hand_computed_attention():
    # Two heads on 4-wide features; the centroid is token 0; temperature 1.
    features = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]])
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    e = math.e
    head1 = torch.tensor([e, 1.0, e]) / (2 * e + 1)  # cosines 1, 0, 1
    head2 = torch.tensor([e, e, 1.0]) / (2 * e + 1)  # cosines 1, 1, 0
    weights = (head1 + head2) / 2
    expected = (weights[:, None] * values[0]).sum(0)[None, None]
    out = cross_attention_aggregate(features, values, torch.tensor([[0]]), num_heads=2, temperature=1.0)
    torch.testing.assert_close(out, expected)
    # One head: the whole 4-wide vectors (cosines 1, 1/2, 1/2), at temperature 0.5.
    one = torch.tensor([2.0, 1.0, 1.0]).exp()
    expected = ((one / one.sum())[:, None] * values[0]).sum(0)[None, None]
    torch.testing.assert_close(cross_attention_aggregate(features, values, torch.tensor([[0]]), 1, 0.5), expected)


def test_the_pipeline_returns_sorted_centroids_with_their_aggregates():
    features, values = hand_features(count=10, width=4), hand_features(count=10, width=5, seed=2)
    for strategy in ("fps", "connectivity"):
        centroids, condensed = condense(features, values, 4, strategy, num_heads=2, temperature=0.1)
        assert torch.equal(centroids, centroids.sort(dim=1).values) and centroids.shape == (2, 4)
        assert torch.equal(centroids, select_centroids(features, 4, strategy))
        torch.testing.assert_close(condensed, cross_attention_aggregate(features, values, centroids, 2, 0.1))
    # A tiny temperature leaves each centroid its own value (its cosine with itself is the unique maximum).
    centroids, condensed = condense(features, values, 3, "fps", num_heads=1, temperature=1e-4)
    torch.testing.assert_close(condensed, values.gather(1, centroids[:, :, None].expand(-1, -1, 5)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: farthest_point_sampling(cosine_similarity_matrix(f), 8), "M = 8 centroids from 7 tokens"),
        (lambda f: connectivity_centroids(cosine_similarity_matrix(f), 0), "M = 0"),
        (lambda f: select_centroids(f, 2, "kmeans"), "unknown condensation strategy 'kmeans'"),
        (lambda f: farthest_point_sampling(cosine_similarity_matrix(f), 2, "first"), "start must be one of"),
        (lambda f: cross_attention_aggregate(f, f, torch.zeros(2, 1, dtype=torch.long), 2, 0.1), "divide"),
        (lambda f: cross_attention_aggregate(f, f, torch.zeros(2, 1, dtype=torch.long), 1, 0.0), "temperature"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(hand_features())


def test_timing_script_runs(capsys):
    from rcpp_hf.benchmark.centroid_timing import main

    assert main(["--tokens", "12", "--width", "8", "--heads", "2", "--centroids", "2", "6", "--repeats", "1",
                 "--device", "cpu"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("N = 12 tokens") and len(lines) == 5 and lines[-1].split()[0] == "6"
