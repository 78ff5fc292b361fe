"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv:2502.11494, EMNLP 2025; ZichenWen1/DART, the LLaVA decoder's `get_retained_image_token` and its eval scripts
`scripts/v1_5/eval/*.sh`).

No attention score decides what stays: DART keeps the visual tokens that duplicate the others least. Before decoder
layer K (2 of 32, the scripts' `--pruned_layer 2`), with what layer K - 1 produced:
  1. pivots (`pivot_tokens`): the `pivot_image_tokens` visual tokens and the `pivot_text_tokens` tokens of the text
     after the image whose keys at layer K - 1 have the largest L1 norm (every key / value head side by side; the
     scripts' 4 + 4, `--pivot_image_token 4 --pivot_text_token 4`). The keys are read as cached, after RoPE, as
     ModelTC/llmc's port of DART reads them; the official code takes them from its decoder layer's outputs;
  2. least duplicated (`least_duplicated`): pivot by pivot, the visual tokens not yet kept whose hidden states
     entering layer K, passed through the decoder's final norm as the repository does, have the lowest cosine
     similarity to the pivot's;
  3. the kept visual tokens are the image pivots and every pivot's picks (the text pivots are text: they stay anyway).
From layer K on only those and all text are computed and cached, at their original positions (as the repository,
which also keeps `position_ids` of the kept entries).

Deviations, for the library's conventions (docs/methods/dart.md):
  - the budget is exactly the visual tokens kept: the image pivots plus `budget - image pivots` picks spread as evenly
    as possible over the pivots. The repository gives each pivot `max_num_trunction // pivots` picks on top of its
    image pivots, so its "128" keeps 4 + 8 * 16 = 132 visual tokens;
  - pivots are visited in prompt order (image pivots, then text pivots); the repository visits a Python set of their
    indices, whose order is the set's hashing order;
  - every row of a batch chooses on its own (the repository reads row 0 of a batch of one, the image span fixed by
    `image_token_start_index` / `image_token_length`); here the image and text spans come from each row's layout, so
    left-padded rows work, and the attention implementation is any (the keys are read from the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PruneContext, PruneStage, scale_layer
from rcpp_hf.methods.budget import budget_count, check_budget, published_fraction
from rcpp_hf.methods.prefill_pruner import PrefillPruner
from rcpp_hf.methods.registry import register_method

DART_LAYER = 2  # K, `--pruned_layer 2` of the LLaVA-1.5 scripts, for a 32-layer decoder
DART_PIVOT_IMAGE_TOKENS = 4  # `--pivot_image_token 4`
DART_PIVOT_TEXT_TOKENS = 4  # `--pivot_text_token 4`
DART_BUDGET = published_fraction(128)  # `--max_num_trunction 128` of LLaVA-1.5's 576 (the README's examples)


def key_l1_norms(keys: torch.Tensor) -> torch.Tensor:
    """L1 norm of each entry's key, heads side by side (the repository's `torch.norm(k_states, p=1)`).

    Args:
        keys: (B, H_kv, S, d) a layer's keys, RoPE applied (as cached).
    Returns:
        (B, S) float32. With grouped-query attention the repository's repeated heads scale every norm alike, so
        the ranking is the same.
    """
    return keys.float().abs().sum(dim=-1).sum(dim=1)


def pivot_tokens(norms: torch.Tensor, count: int) -> torch.Tensor:
    """Step 1, the pivots: the `count` entries of largest norm (ties to the lower index), in index order.

    Args:
        norms: (n,) the candidates' key norms.
        count: pivots, in [0, n].
    Returns:
        (count,) indices into `norms`, increasing.
    """
    if not 0 <= count <= norms.shape[0]:
        raise ValueError(f"count must be in [0, {norms.shape[0]}], got {count}")
    order = torch.sort(norms, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def split_picks(total: int, pivots: int) -> list[int]:
    """How many tokens each of `pivots` pivots picks so that they pick `total` in all: as evenly as possible, the
    first `total % pivots` one more (the repository's `TOKEN_TOPK`, one count for every pivot, gives them
    `pivots * (total // pivots)`)."""
    if pivots < 1:
        if total:
            raise ValueError(f"{total} picks asked of no pivot")
        return []
    return [total // pivots + (index < total % pivots) for index in range(pivots)]


def least_duplicated(
    features: torch.Tensor, pivots: torch.Tensor, picks: list[int], taken: torch.Tensor
) -> torch.Tensor:
    """Step 2, duplication: pivot by pivot, the `picks[i]` visual tokens not yet taken of lowest cosine similarity
    to pivot i (ties to the lower index); each pick is taken before the next pivot chooses.

    Args:
        features: (V, D) the visual tokens' features (the repository's normed hidden states).
        pivots: (P, D) the pivots' features, in the order they choose.
        picks: P counts.
        taken: (V,) bool, tokens that cannot be picked (the image pivots).
    Returns:
        (sum(picks),) distinct visual token indices, pivot by pivot.
    """
    unit = F.normalize(features.float(), dim=-1)
    pivot_unit = F.normalize(pivots.float(), dim=-1)
    taken = taken.clone()
    chosen = []
    for pivot, count in zip(pivot_unit, picks):
        if count == 0:
            continue
        if count > int((~taken).sum()):
            raise ValueError(f"{count} picks asked, {int((~taken).sum())} visual tokens left")
        similarity = (unit @ pivot).masked_fill(taken, float("inf"))
        pick = torch.sort(similarity, stable=True).indices[:count]
        taken[pick] = True
        chosen.append(pick)
    return torch.cat(chosen) if chosen else features.new_zeros(0, dtype=torch.long)


def dart_select(
    features: torch.Tensor,
    key_norms: torch.Tensor,
    text_features: torch.Tensor,
    text_key_norms: torch.Tensor,
    keep: int,
    image_pivots: int,
    text_pivots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DART on one row: the `keep` visual tokens it keeps.

    Args:
        features: (V, D) the visual tokens' features (normed hidden states entering layer K).
        key_norms: (V,) their key norms at layer K - 1.
        text_features: (T, D) the features of the text after the image (the row's real entries only).
        text_key_norms: (T,) their key norms.
        keep: visual tokens kept, in [1, V].
        image_pivots, text_pivots: pivots asked for; at most `keep` image and T text pivots are taken.
    Returns:
        (keep,) distinct visual token indices (image pivots first), and the image pivots (k,).
    """
    num_visual = features.shape[0]
    image = pivot_tokens(key_norms, min(image_pivots, keep, num_visual))
    text = pivot_tokens(text_key_norms, min(text_pivots, text_features.shape[0]))
    pivots = torch.cat([features[image], text_features[text]])  # prompt order: the image comes before its text
    remaining = keep - image.shape[0]
    if remaining and pivots.shape[0] == 0:
        raise ValueError("DART needs at least one pivot: this row has no text after the image and no image pivot")
    taken = torch.zeros(num_visual, dtype=torch.bool, device=features.device)
    taken[image] = True
    picked = least_duplicated(features, pivots, split_picks(remaining, pivots.shape[0]), taken)
    return torch.cat([image, picked]), image


@register_method
@dataclass
class DART(PrefillPruner):
    """Args:
        budget: visual tokens kept from `layer` on, pivots included, a budget (a count of this model's image or a
            fraction of it, `methods/budget.py`). Default 128 / 576 (the repository's `max_num_trunction 128`).
        layer: K, the decoder layer before which the others are dropped, a layer index of this model (None: 2 of
            32, scaled by depth). Pivots and features are read from what layer K - 1 produced.
        pivot_image_tokens: image pivots, the visual tokens of largest key L1 norm (default 4, as the scripts).
        pivot_text_tokens: text pivots, among the text after the image (default 4, as the scripts).
    """

    name = "dart"
    budget: int | float = DART_BUDGET
    layer: int | None = None
    pivot_image_tokens: int = DART_PIVOT_IMAGE_TOKENS
    pivot_text_tokens: int = DART_PIVOT_TEXT_TOKENS

    CONTRACT_NEUTRAL = {"budget": 16}  # every visual token of the tiny model's image
    CONTRACT_ACTING = {"budget": 7, "pivot_image_tokens": 2, "pivot_text_tokens": 2}  # pivots and picks both act
    CONTRACT_INVALID = {"budget": 0, "layer": 0, "pivot_image_tokens": -1, "pivot_text_tokens": 1.5}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        check_budget(self, "budget")
        if self.layer is not None and not (isinstance(self.layer, int) and not isinstance(self.layer, bool)
                                           and self.layer >= 1):  # fmt: skip
            self.fail("layer", "must be None or an integer >= 1 (a decoder layer; the pivots are read before it)")
        for field in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, field)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                self.fail(field, "must be an integer >= 0")
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            self.fail("pivot_text_tokens", "and pivot_image_tokens cannot both be 0: DART needs a pivot")

    def pruning_layer(self, num_layers: int) -> int:
        return self.layer if self.layer is not None else scale_layer(DART_LAYER, num_layers)

    def resolve_stages(self, num_layers: int, num_visual: int) -> list[PruneStage]:
        layer = self.pruning_layer(num_layers)
        if layer > num_layers - 1:
            self.fail("layer", f"must lie below this model's {num_layers} decoder layers")
        return [PruneStage(layer=layer, keep=budget_count(self, "budget", num_visual))]

    # attention_layer: the default, layer K - 1, whose recorded attention holds the keys the pivots are ranked by.

    def select(self, ctx: PruneContext) -> torch.Tensor:
        seq = ctx.layout.seq_len
        features = ctx.language_model.norm(ctx.hidden).float()  # (B, S, D), the repository's `self.norm(...)`
        norms = key_l1_norms(ctx.attention.keys[:, :, -seq:])  # (B, S): this forward's entries of layer K - 1
        slots = ctx.layout.visual_slots  # (B, V)
        text_rows, text_real = text_after_image(ctx.layout)  # (B, T)
        ctx.scores = norms.gather(1, slots)
        kept, image_pivots, text_pivots = [], [], []
        for row in range(slots.shape[0]):
            text = text_rows[row][text_real[row]]
            columns, pivots = dart_select(features[row, slots[row]], norms[row, slots[row]], features[row, text],
                                          norms[row, text], ctx.stage.keep, self.pivot_image_tokens,
                                          self.pivot_text_tokens)  # fmt: skip
            kept.append(columns)
            image_pivots.append(ctx.layout.visual_ids[row, slots[row, pivots]].tolist())
            text_pivots.append(min(self.pivot_text_tokens, text.shape[0]))
        ctx.details.update(image_pivots=image_pivots, text_pivots=text_pivots)
        return torch.stack(kept)
