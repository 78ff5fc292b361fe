"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference"):
the scoring and selection maths, as pure batched functions.

Source: Gumpest/SparseVLMs, `llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`),
`score.py` (`attn_postprocess_topk`, the keep lists) and `utils.py` (`cluster_and_merge`), version "1_0" (v1).

How the pieces fit (LLaVA-1.5-7B, 32 layers):
- raters are chosen once, on the language model's input embeddings (`select_text_raters`);
- after each layer in `SPARSEVLM_LAYERS`, the text raters' attention over the visual tokens *in that same layer*
  ranks the visual tokens (`rater_scores`), the top `SPARSEVLM_KEEP[budget][stage]` survive (`keep_top_scored`;
  other budgets and image sizes: `sparsevlm_keep_counts`) and
  the pruned layer's *output* hidden states are what later layers see;
- optionally, some deleted tokens are recycled into a few merged tokens (`recycle_tokens`).

Batching: every function takes rows that are independent (left padding is handled by the caller, who extracts the
visual span and the text after it per row); the same number of visual tokens is kept in every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PruneContext, PruneStage, scale_layers
from rcpp_hf.methods.budget import budget_fraction, check_budget, published_fraction
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

# Pruning happens on the output of these layers (0-based), i.e. layers 3-6 see the first keep count.
# Source: `LlamaDynamicvitModel.__init__(pruning_loc=[2, 6, 15])`.
SPARSEVLM_LAYERS = (2, 6, 15)

# Visual tokens kept after each pruning layer, per budget, both counts of LLaVA-1.5's 576 visual tokens; the v1
# lists of `score.py`:
#     budget | after layer 2 | after layer 6 | after layer 15
#       192  |      300      |      200      |      110
#       128  |      303      |      110      |       36
#        96  |      238      |       48      |       26
#        64  |       66      |       30      |       17
# They are "equivalent" budgets only roughly: see `average_visual_tokens`.
SPARSEVLM_KEEP = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}

SPARSEVLM_NUM_VISUAL = 576  # the keep lists are counts of LLaVA-1.5's 576 visual tokens
SPARSEVLM_BUDGET = published_fraction(128)


def keep_shares(share: float) -> tuple[float, ...]:
    """The keep list of a budget `share` of the image, in (0, 1], as shares of the image.

    The published lists, as shares of 576, are the knots at their budgets' shares (64 / 576, ..., 192 / 576), with
    nothing kept at share 0 and everything at share 1; between two knots each stage's share is interpolated linearly.
    At a published budget's share the list is the published one exactly; below 64 / 576 the 64 list shrinks in
    proportion, above 192 / 576 the 192 list grows toward keeping every token."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    stages = len(SPARSEVLM_LAYERS)
    knots = [(0.0, (0.0,) * stages)]
    knots += [(budget / SPARSEVLM_NUM_VISUAL, tuple(k / SPARSEVLM_NUM_VISUAL for k in SPARSEVLM_KEEP[budget]))
              for budget in sorted(SPARSEVLM_KEEP)]  # fmt: skip
    knots += [(1.0, (1.0,) * stages)]
    upper = next(i for i, (at, _) in enumerate(knots) if at >= share)
    if knots[upper][0] == share:
        return knots[upper][1]
    (low, low_keep), (high, high_keep) = knots[upper - 1], knots[upper]
    t = (share - low) / (high - low)
    return tuple(a + t * (b - a) for a, b in zip(low_keep, high_keep))


def sparsevlm_keep_counts(share: float, num_visual: int = SPARSEVLM_NUM_VISUAL) -> tuple[int, ...]:
    """Visual tokens kept after each pruning layer for a budget `share` of an image of `num_visual` tokens: the
    interpolated shares (`keep_shares`) resolved as budget fractions are, max(1, round(share * V)). On 576 tokens a
    published budget (e.g. 128 / 576) gives the repository's list unchanged. Non-increasing, at most `num_visual`."""
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    return tuple(max(1, round(keep * num_visual)) for keep in keep_shares(share))


def average_visual_tokens(
    keep_counts: tuple[int, ...], layers: tuple[int, ...], num_layers: int, num_visual: int
) -> float:
    """Visual tokens per decoder layer, averaged over the `num_layers` layers: layers up to and including
    `layers[0]` see `num_visual`, layers after `layers[s]` see `keep_counts[s]`.

    (The repository's comment `2*576 4*300 10*200 16*110` counts one layer fewer at full length and one more at the
    last count; its logger counts differently again. This counts what each layer computes.)
    """
    if len(keep_counts) != len(layers):
        raise ValueError(f"keep_counts must have one count per layer {layers}, got {keep_counts}")
    if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers must be increasing indices in [0, {num_layers}), got {layers}")
    boundaries = [-1, *layers, num_layers - 1]
    counts = [num_visual, *keep_counts]
    total = sum((boundaries[s + 1] - boundaries[s]) * counts[s] for s in range(len(counts)))
    return total / num_layers


def select_text_raters(
    visual_hidden: torch.Tensor, text_hidden: torch.Tensor, text_valid: torch.Tensor
) -> torch.Tensor:
    """Text raters: the text tokens most relevant to the image (paper section 3.2).

    Formula (`LlamaDynamicvitModel.forward`, "Select Text Raters"): R = softmax_t(V T^T) (no scaling), averaged over
    the visual tokens, gives one relevance per text token; a text token is a rater when its relevance is strictly
    above the mean relevance. The repository applies it to the language model's *input embeddings* (projector
    outputs for V; word embeddings of every token after the image, i.e. the question and the assistant prefix, for
    T), once, and reuses the same raters at every pruning layer.

    Padding: the softmax and the mean run over the valid text tokens only. A row whose relevances are all equal has
    no token above the mean (the repository would then average over no rows and get NaN); all its valid tokens rate.

    Args:
        visual_hidden: (batch, V, D) visual input embeddings.
        text_hidden: (batch, T, D) embeddings of the text after the image.
        text_valid: (batch, T) bool, False on padding.
    Returns:
        (batch, T) bool raters (never True on padding, at least one per row).
    """
    if visual_hidden.dim() != 3 or visual_hidden.shape[1] < 1:
        raise ValueError(f"visual_hidden must be (batch, V >= 1, D), got {tuple(visual_hidden.shape)}")
    if text_hidden.dim() != 3 or text_hidden.shape[0] != visual_hidden.shape[0] or (
        text_hidden.shape[2] != visual_hidden.shape[2]
    ):
        raise ValueError(f"text_hidden must be (batch, T, D) matching visual_hidden, got {tuple(text_hidden.shape)}")
    if text_valid.dtype != torch.bool or text_valid.shape != text_hidden.shape[:2]:
        raise ValueError(
            f"text_valid must be a (batch, T) bool tensor, got {text_valid.dtype} {tuple(text_valid.shape)}"
        )
    if not text_valid.any(dim=1).all():
        raise ValueError("text_valid must mark at least one text token in every row")
    logits = visual_hidden.float() @ text_hidden.float().transpose(1, 2)  # (batch, V, T)
    logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
    relevance = logits.softmax(dim=-1).mean(dim=1)  # (batch, T), 0 on padding
    mean = relevance.sum(dim=1, keepdim=True) / text_valid.sum(dim=1, keepdim=True)
    raters = (relevance > mean) & text_valid
    return torch.where(raters.any(dim=1, keepdim=True), raters, text_valid)


def rater_scores(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Visual token scores at a pruning layer (`score.py`, `attn_postprocess_topk`): the attention probabilities of
    that layer, averaged over heads, then over the rater rows.

    Args:
        attention: (batch, heads, T, V) the text rows' attention probabilities over the visual keys (softmax over
            the full causal row, not renormalised over the visual span).
        raters: (batch, T) bool, from `select_text_raters`.
    Returns:
        (batch, V) float32.
    """
    if attention.dim() != 4:
        raise ValueError(f"attention must be (batch, heads, T, V), got {tuple(attention.shape)}")
    if raters.dtype != torch.bool or raters.shape != (attention.shape[0], attention.shape[2]):
        raise ValueError(f"raters must be a (batch, T) bool tensor matching attention, got {tuple(raters.shape)}")
    if not raters.any(dim=1).all():
        raise ValueError("raters must mark at least one text token in every row")
    head_mean = attention.float().mean(dim=1)  # (batch, T, V)
    weights = raters.float()[:, :, None]
    return (head_mean * weights).sum(dim=1) / weights.sum(dim=1)


def keep_top_scored(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """(batch, V) scores -> (batch, V) bool, True on the `keep` highest-scored tokens of each row (`torch.topk`, as
    `attn_postprocess_topk`).

    The repository caps `keep` at V - 1 so that recycling always has a deleted token; here `keep == V` keeps
    everything, so that a budget above the image's tokens is exactly vanilla."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, V), got {tuple(scores.shape)}")
    if not 1 <= keep <= scores.shape[1]:
        raise ValueError(f"keep must be in [1, {scores.shape[1]}], got {keep}")
    top = scores.topk(keep, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)


def density_peak_clusters(features: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN clustering (density peaks with k nearest neighbours, from TCFormer), as `utils.py` `cluster_and_merge`.

    - distance d(i, j) = ||x_i - x_j||_2 / sqrt(D);
    - density rho_i = exp(-mean of d^2 to its k = `num_clusters` nearest tokens, itself included);
    - delta_i = distance to the nearest denser token (the densest token: the largest distance in the row);
    - centres: the `num_clusters` largest rho * delta; every token joins its nearest centre, a centre itself.
    The repository breaks density ties with 1e-6 uniform noise; here ties go to the lower index (deterministic), in
    the density order and in the choice of centres.

    Args:
        features: (batch, N, D).
    Returns:
        centres (batch, num_clusters) token indices, in score order; assignment (batch, N) cluster index in [0, k).
    """
    batch, num_tokens, dim = features.shape
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(f"num_clusters must be in [1, {num_tokens}], got {num_clusters}")
    x = features.float()
    distance = torch.cdist(x, x) / dim**0.5  # (batch, N, N)
    nearest = distance.topk(num_clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # (batch, N)
    index = torch.arange(num_tokens, device=features.device)
    lower_index = index[None, :] < index[:, None]  # (N, N): j < i
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & lower_index
    )  # denser[b, i, j]: token j is denser than token i
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, distance, farthest).min(dim=-1).values
    centres = torch.sort(delta * density, dim=-1, descending=True, stable=True).indices[:, :num_clusters]
    to_centres = distance.gather(1, centres[:, :, None].expand(-1, -1, num_tokens))  # (batch, k, N)
    assignment = to_centres.argmin(dim=1)
    cluster_ids = torch.arange(num_clusters, device=features.device).expand(batch, -1)
    assignment = assignment.scatter(1, centres, cluster_ids)
    return centres, assignment


def recycle_tokens(
    visual_hidden: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, ratio: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token recycling (SparseVLM v1, `LlamaDynamicvitModel.forward`, "merge and cluster").

    Of the n deleted tokens of a row, the `int(n * ratio) + 1` highest-scored are clustered into
    `int(m / 10) + 1` clusters by `density_peak_clusters` (m = that count), and each cluster is merged into the plain
    mean of its members' hidden states.

    Positions: the repository inserts the merged tokens right after the kept visual tokens and renumbers every
    position compactly. Here each merged token takes the place (and original position) of its cluster's centre, a
    deleted token: the caller keeps that entry and overwrites its hidden state, so no entry is inserted and every
    position stays an original one. The merged tokens then count as visual tokens at the next pruning layer, as in
    the repository.

    Args:
        visual_hidden: (batch, V, D) the pruning layer's *output* hidden states of the visual tokens.
        scores: (batch, V) the scores the selection used (`rater_scores`).
        keep: (batch, V) bool, the kept tokens; every row deletes the same number of tokens.
        ratio: fraction of the deleted tokens that are recycled, in (0, 1].
    Returns:
        merged (batch, c, D) in visual_hidden's dtype, and the visual index (batch, c) of the deleted token each
        merged token replaces, increasing along c; c = 0 when nothing is deleted.
    """
    if visual_hidden.dim() != 3:
        raise ValueError(f"visual_hidden must be (batch, V, D), got {tuple(visual_hidden.shape)}")
    if scores.shape != visual_hidden.shape[:2]:
        raise ValueError(f"scores must be (batch, V) = {tuple(visual_hidden.shape[:2])}, got {tuple(scores.shape)}")
    if keep.dtype != torch.bool or keep.shape != visual_hidden.shape[:2]:
        raise ValueError(f"keep must be a (batch, V) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    deleted_counts = (~keep).sum(dim=1)
    if not (deleted_counts == deleted_counts[0]).all():
        raise ValueError(f"keep must delete the same number of tokens in every row, got {deleted_counts.tolist()}")
    batch, _, dim = visual_hidden.shape
    num_deleted = int(deleted_counts[0])
    if num_deleted == 0:
        return visual_hidden.new_zeros(batch, 0, dim), keep.new_zeros(batch, 0, dtype=torch.long)
    num_recycled = min(int(num_deleted * ratio) + 1, num_deleted)
    num_clusters = num_recycled // 10 + 1
    # Deleted tokens first, best-scored first; kept tokens can never be among the top `num_recycled`.
    ranking = scores.float().masked_fill(keep, float("-inf")).topk(num_recycled, dim=1).indices  # (batch, m)
    recycled = visual_hidden.gather(1, ranking[:, :, None].expand(-1, -1, dim)).float()
    centres, assignment = density_peak_clusters(recycled, num_clusters)
    members = torch.nn.functional.one_hot(assignment, num_clusters).float()  # (batch, m, c)
    merged = (members.transpose(1, 2) @ recycled) / members.sum(dim=1)[:, :, None]
    representative = ranking.gather(1, centres)
    order = representative.argsort(dim=1)
    merged = merged.gather(1, order[:, :, None].expand(-1, -1, dim)).to(visual_hidden.dtype)
    return merged, representative.gather(1, order)


# -- the method, on the engine's prefill pruning ----------------------------------------------------------------------
@register_method
@dataclass
class SparseVLM(PrefillPruner):
    """SparseVLM v1 on the engine: after each of its layers, the text raters' attention ranks the visual tokens.

    Args:
        budget: a budget (a count of this model's image or a fraction of it, `methods/budget.py`), read as its share
            of the image: the keep list is interpolated between the published ones at that share
            (`sparsevlm_keep_counts`; the published 64 / 96 / 128 / 192 of 576 are 0.1111 / 0.1667 / 0.2222 /
            0.3333). Default 128 / 576.
        layers: the pruning layers, this model's layer indices (their attention ranks, the next layer is the first
            to run pruned); None: (2, 6, 15) of 32, scaled by depth.
        token_recycling: token recycling (merge the best deleted tokens into a few, kept at a representative's position).
        recycle_ratio: fraction of the deleted tokens recycled.
    """

    name = "sparsevlm"
    budget: int | float = SPARSEVLM_BUDGET
    layers: tuple[int, ...] | None = None
    token_recycling: bool = False
    recycle_ratio: float = 0.3

    CONTRACT_NEUTRAL = {"budget": 16}  # the whole image: every stage keeps every token
    CONTRACT_ACTING = {"budget": 4}  # a quarter of the tiny image's 16 tokens, between the published 128 and 192
    CONTRACT_INVALID = {"recycle_ratio": 0.0, "layers": (6, 2, 15)}
    CONTRACT_MASKABLE = True  # without token recycling (the default), which gives merged tokens new states

    def __post_init__(self):
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        check_budget(self, "budget")
        if self.layers is not None and (
            len(self.layers) != len(SPARSEVLM_LAYERS) or list(self.layers) != sorted(set(self.layers))
            or self.layers[0] < 0
        ):
            self.fail("layers", f"must be None or {len(SPARSEVLM_LAYERS)} increasing layer indices >= 0")
        if not isinstance(self.token_recycling, bool):
            self.fail("token_recycling", "must be True or False")
        if not 0.0 < self.recycle_ratio <= 1.0:
            self.fail("recycle_ratio", "must lie in (0, 1]")

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        keeps = sparsevlm_keep_counts(budget_fraction(self, "budget", num_visual), num_visual)
        if self.layers is not None:
            stage_layers = tuple(layer + 1 for layer in self.layers)
        else:
            stage_layers = scale_layers(tuple(layer + 1 for layer in SPARSEVLM_LAYERS), num_layers)
        return [PruneStage(layer, keep) for layer, keep in zip(stage_layers, keeps)]

    def score(self, ctx: PruneContext) -> torch.Tensor:
        prompt_rows, prompt_real = text_after_image(ctx.prompt_layout)
        embeds = ctx.inputs_embeds
        visual = embeds.gather(1, ctx.prompt_layout.visual_slots[:, :, None].expand(-1, -1, embeds.shape[-1]))
        text = embeds.gather(1, prompt_rows[:, :, None].expand(-1, -1, embeds.shape[-1]))
        raters = select_text_raters(visual, text, prompt_real)
        rows, real = text_after_image(ctx.layout)
        attention = ctx.visual_columns(ctx.attention_rows(rows))  # (B, H, T, Vl)
        ctx.details.setdefault("num_raters", raters.sum(dim=1).tolist())
        return rater_scores(attention, raters & real)

    def recycle(self, ctx: PruneContext, kept: torch.Tensor):
        if not self.token_recycling:
            return None
        hidden = ctx.hidden.gather(1, ctx.layout.visual_slots[:, :, None].expand(-1, -1, ctx.hidden.shape[-1]))
        keep_mask = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device).scatter(1, kept, True)
        merged, representative = recycle_tokens(hidden, ctx.scores, keep_mask, self.recycle_ratio)
        return (representative, merged) if representative.shape[1] else None
