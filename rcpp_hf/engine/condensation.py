"""Token condensation: M representative visual tokens ("centroids") absorb all N by cross-attention instead of the
other N - M being cut (YangXu-03/Himap-based `token_condensation.py`, on HiMAP's stages).

Pipeline, every step a pure batched function:
  1. `cosine_similarity_matrix` of the tokens' features, (B, N, N);
  2. centroids by `farthest_point_sampling` (greedy max-min on 1 - cos: even coverage of feature space; the first
     point is the most isolated token, as DivPrune, or a seeded random one) or by `connectivity_centroids` (top-M by
     degree, the sum of a token's similarities: the densest regions; one pass, no loop over M);
  3. `cross_attention_aggregate`: centroids as queries, all N tokens as keys and values, several heads.

Parameter-free form (inference only, nothing trained; that repository's untrained random q/k/v/o projections would be
noise):
  - features = the pruned layer's own keys before RoPE, `k_proj(input_layernorm(h))`, the kv heads concatenated.
    Keys are what the layer compares tokens by, so token similarity is measured the way the model measures it
    (ToMe, VisionZip and PruMerge merge on keys); RoPE is left out so that similarity is content, not distance in
    the image; raw hidden states are not used because a few massive-activation channels dominate their cosine.
  - heads = equal slices of that key vector (default: the layer's kv heads); head h weighs token j by
    softmax_j(cos_h(centroid, j) / temperature). Cosine logits lie in [-1, 1]: at temperature 1 every weight is
    within e^2 of every other and a centroid would become the image's mean; 0.1 keeps the weight on the centroid
    and its near-duplicates (the centroid itself always has the largest logit, 1 / temperature).
  - values = the residual stream entering the layer (the state the layer would have read), averaged with the
    head-mean weights: a convex combination of whole residual vectors stays on the scale the next layers expect
    (per-head slices of the residual stream would mix channels that no head owns).
Each condensed token takes the centroid's place: its original position (RoPE) and visual id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONDENSATION_STRATEGIES = ("fps", "connectivity")
FPS_STARTS = ("isolated", "random")


def check_count(count: int, num_tokens: int) -> None:
    if not 1 <= count <= num_tokens:
        raise ValueError(f"cannot pick M = {count} centroids from {num_tokens} tokens (M must lie in [1, N])")


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of tokens: (B, N, F) -> (B, N, N) float32 (L2-normalised, then inner
    products; a zero vector has similarity 0 to everything)."""
    normed = F.normalize(features.float(), dim=-1)
    return normed @ normed.transpose(1, 2)


def most_isolated(distance: torch.Tensor) -> torch.Tensor:
    """(B, N, N) distances -> (B,) the token whose nearest other token is farthest (DivPrune's first pick; ties to
    the lower index). With N = 1, token 0."""
    num_tokens = distance.shape[-1]
    if num_tokens == 1:
        return torch.zeros(distance.shape[0], dtype=torch.long, device=distance.device)
    self_pairs = torch.eye(num_tokens, dtype=torch.bool, device=distance.device)
    nearest = distance.masked_fill(self_pairs, float("inf")).min(dim=-1).values
    return nearest.argmax(dim=-1)


def farthest_point_sampling(
    similarity: torch.Tensor, count: int, start: str = "isolated", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Greedy max-min selection on the distance 1 - cos: each new centroid is the token farthest from the centroids
    already chosen (ties to the lower index). M - 1 sequential steps, each O(N) per row.

    Args:
        similarity: (B, N, N) cosine similarities.
        count: M, in [1, N].
        start: "isolated" (deterministic, `most_isolated`) or "random" (uniform, from `generator`).
    Returns:
        (B, M) token indices in the order chosen.
    """
    batch, num_tokens, _ = similarity.shape
    check_count(count, num_tokens)
    if start not in FPS_STARTS:
        raise ValueError(f"start must be one of {FPS_STARTS}, got {start!r}")
    distance = 1.0 - similarity
    if start == "isolated":
        first = most_isolated(distance)
    else:
        first = torch.randint(num_tokens, (batch,), generator=generator).to(similarity.device)
    rows = torch.arange(batch, device=similarity.device)
    chosen = [first]
    nearest = distance[rows, first]  # (B, N) distance of each token to its nearest centroid
    for _ in range(count - 1):
        nearest = nearest.index_put((rows, chosen[-1]), torch.tensor(-1.0, device=nearest.device))
        chosen.append(nearest.argmax(dim=-1))
        nearest = torch.minimum(nearest, distance[rows, chosen[-1]])
    return torch.stack(chosen, dim=1)


def connectivity_centroids(similarity: torch.Tensor, count: int) -> torch.Tensor:
    """The M tokens of highest degree, degree_i = sum_j cos(i, j) over the other tokens (ties to the lower index).
    (B, N, N) -> (B, M) token indices, by decreasing degree."""
    check_count(count, similarity.shape[-1])
    degree = similarity.sum(dim=-1) - similarity.diagonal(dim1=-2, dim2=-1)
    # A stable descending sort, so that equal degrees keep index order (topk gives no such promise).
    return torch.sort(degree, dim=-1, descending=True, stable=True).indices[:, :count]


def cross_attention_aggregate(
    features: torch.Tensor, values: torch.Tensor, centroids: torch.Tensor, num_heads: int, temperature: float
) -> torch.Tensor:
    """Centroids gather all tokens: per head h (an equal slice of the features), weights
    softmax_j(cos_h(c, j) / temperature) over the N tokens; the heads' weights are averaged and applied to `values`.

    Args:
        features: (B, N, F) the tokens' features (queries and keys), F divisible by `num_heads`.
        values: (B, N, D) what is averaged.
        centroids: (B, M) token indices of the queries.
    Returns:
        (B, M, D) float32.
    """
    batch, num_tokens, width = features.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"num_heads = {num_heads} must be >= 1 and divide the feature width {width}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    heads = F.normalize(features.float().view(batch, num_tokens, num_heads, -1), dim=-1).transpose(1, 2)  # (B,h,N,f)
    queries = heads.gather(2, centroids[:, None, :, None].expand(-1, num_heads, -1, heads.shape[-1]))  # (B, h, M, f)
    weights = ((queries @ heads.transpose(-1, -2)) / temperature).softmax(dim=-1).mean(dim=1)  # (B, M, N)
    return weights @ values.float()


def select_centroids(
    features: torch.Tensor, count: int, strategy: str, start: str = "isolated", generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, N, F) features -> (B, M) centroid indices, increasing (the tokens' order), by `strategy`."""
    if strategy not in CONDENSATION_STRATEGIES:
        raise ValueError(f"unknown condensation strategy {strategy!r}; known: {CONDENSATION_STRATEGIES}")
    similarity = cosine_similarity_matrix(features)
    if strategy == "fps":
        chosen = farthest_point_sampling(similarity, count, start, generator)
    else:
        chosen = connectivity_centroids(similarity, count)
    return chosen.sort(dim=1).values


def condense(
    features: torch.Tensor, values: torch.Tensor, count: int, strategy: str, num_heads: int, temperature: float,
    start: str = "isolated", generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The whole pipeline: N tokens (B, N, F) features and (B, N, D) values -> the M centroids (B, M), increasing,
    and their condensed values (B, M, D) float32."""
    centroids = select_centroids(features, count, strategy, start, generator)
    return centroids, cross_attention_aggregate(features, values, centroids, num_heads, temperature)
