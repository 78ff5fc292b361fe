"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", 2025; Theia-4869/CDPruner, `llava/model/llava_arch.py` `encode_images` and
`llava/model/multimodal_encoder/clip_encoder.py`).

Before the language model, keep the T visual tokens that a conditional determinantal point process finds most
diverse given the instruction: kernel L = diag(r) S diag(r), S the cosine similarity of the projected visual features,
r the instruction relevance of each token; T steps of the fast greedy MAP inference of Chen et al. (NeurIPS 2018).

A deviation, for a kernel whose rank is below T (flat backgrounds: many tokens share one feature): the repository runs
all T steps, so once every marginal gain is spent its square roots of non-positive gains turn the gains into NaN and
argmax picks already chosen tokens again (its index mask then keeps fewer than T). Here the greedy stops there, as
Chen et al.'s code does (a gain below `EXHAUSTED_GAIN`), and the remaining slots go to the most relevant
tokens not chosen, so exactly T distinct tokens are kept (docs/methods/cdpruner.md gives the measured difference).

Relevance, as the repository: minus the mean cosine between each token's image embedding and the instruction's text
embeddings, min-max normalised (per row here; the repository normalises over its batch of one sample's images).
  - with `clip_model` (a CLIPModel checkpoint, as the repository's `load_text_tower`): image embeddings are CLIP's
    visual projection of the tower's post-layernorm feature-layer patches, text embeddings CLIP's of the instruction;
  - without one (llava-hf checkpoints carry no CLIP text tower) -- a deviation: the language model's own input
    embeddings of the instruction tokens against the projected visual features (the inputs the decoder sees).
The instruction is the text after the image (llava-hf's template: the question and "ASSISTANT:"). The repository
splits long texts into 77-token segments; here CLIP's text is truncated to its positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from rcpp_hf.engine.layout import text_after_image
from rcpp_hf.engine.pruning import PruneContext
from rcpp_hf.engine.vision import VisionRecord, gather_tokens
from rcpp_hf.methods.prefill_pruner import VisionPruner
from rcpp_hf.methods.registry import register_method


def instruction_relevance(image: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """r = minus the mean cosine of each image token to the valid text tokens, min-max normalised per row
    (`(r - min + 1e-6) / (max - min)` as the repository).

    Args:
        image: (batch, N, D) image-side embeddings.
        text: (batch, M, D) text-side embeddings.
        text_valid: (batch, M) bool.
    Returns:
        (batch, N) float32.
    """
    cosine = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # (B, N, M)
    weights = text_valid.float()[:, None, :]
    relevance = -(cosine * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)
    low, high = relevance.min(dim=1, keepdim=True).values, relevance.max(dim=1, keepdim=True).values
    return (relevance - low + 1e-6) / (high - low).clamp_min(1e-12)


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r), S the cosine similarity of `features` (batch, N, D); r (batch, N) -> (batch, N, N)."""
    normed = F.normalize(features.float(), dim=-1)
    return relevance[:, :, None] * (normed @ normed.transpose(1, 2)) * relevance[:, None, :]


# Chen et al.'s stopping threshold on d_j^2 (the epsilon of their code, laming-chen/fast-map-dpp); L's diagonal is
# r^2 here, at most about 1, so it is also relative to the largest gain. A gain below it is rounding, not diversity;
# the float32 kernel's rounding reaches about 1e-7, so picks just above it may be rounding too (as in the repository,
# which takes them alike).
EXHAUSTED_GAIN = 1e-10


def dpp_greedy_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018, Algorithm 1), batched: each step adds the item that
    most increases log det L_S, using incremental Cholesky rows instead of determinants. A row stops once its best
    marginal gain falls below `EXHAUSTED_GAIN` (L's rank is spent: any further item adds nothing to det L_S).

    Args:
        kernel: (batch, N, N) positive semi-definite.
        count: items to select, in [1, N].
    Returns:
        (batch, count) distinct item indices in the order chosen, -1 in the slots after a row stopped.
    """
    batch, num_items, _ = kernel.shape
    if not 1 <= count <= num_items:
        raise ValueError(f"count must be in [1, {num_items}], got {count}")
    rows = torch.arange(batch, device=kernel.device)
    cholesky = kernel.new_zeros(count, batch, num_items)  # c_i of every item, one row per step
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i^2: the marginal gain of adding item i
    chosen = torch.empty(count, batch, dtype=torch.long, device=kernel.device)
    for step in range(count):
        best = gains.argmax(dim=-1)
        gain = gains[rows, best]
        # A stopped row's gains stay as they are (its update is zero), so it stays stopped.
        active = gain >= EXHAUSTED_GAIN  # (batch,); a NaN gain stops too
        chosen[step] = torch.where(active, best, -1)
        done = cholesky[:step, rows, best]  # (step, batch)
        residual = kernel[rows, best] - torch.einsum("sb,sbn->bn", done, cholesky[:step])  # (batch, N)
        row = torch.where(active[:, None], residual / torch.where(active, gain, 1.0).sqrt()[:, None], 0.0)
        cholesky[step] = row
        gains = gains - row**2
        gains[rows[active], best[active]] = -float("inf")
    return chosen.t()


def fill_by_relevance(chosen: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Fill the slots `dpp_greedy_map` left at -1 with the most relevant items not chosen, in decreasing relevance
    (ties to the lower index).

    Args:
        chosen: (batch, count) distinct item indices, -1 in a suffix of the slots.
        relevance: (batch, N).
    Returns:
        (batch, count) distinct item indices.
    """
    batch, count = chosen.shape
    picked = torch.zeros(batch, relevance.shape[1] + 1, dtype=torch.bool, device=chosen.device)
    picked = picked.scatter(1, chosen + 1, True)[:, 1:]  # -1 lands in the dropped column 0
    ranked = torch.sort(relevance.float().masked_fill(picked, -float("inf")), dim=1, descending=True,
                        stable=True).indices  # unpicked first  # fmt: skip
    missing = (chosen < 0).sum(dim=1, keepdim=True)  # (batch, 1)
    slot = torch.arange(count, device=chosen.device)[None, :]
    fill = ranked.gather(1, (slot - (count - missing)).clamp_min(0))  # the j-th missing slot takes the j-th ranked
    return torch.where(chosen < 0, fill, chosen)


@lru_cache(maxsize=2)
def load_clip(path: str):
    """A CLIPModel and its tokenizer from `path` (loaded once per path)."""
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=2)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def clip_embeddings(clip, tokenizer, vision: VisionRecord, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """CLIP's image embeddings of the visual tokens (B, V, P) and text embeddings of `texts` (B, 1, P)."""
    width = vision.features.shape[-1]
    if clip.visual_projection.in_features != width or vision.post_layernorm is None:
        raise ValueError(
            f"CDPruner.clip_model: its visual projection takes width {clip.visual_projection.in_features}, the "
            f"model's vision features have width {width}; it must be the CLIP model of the LLaVA's vision tower"
        )
    device = vision.features.device
    clip = clip.to(device)
    image = clip.visual_projection(vision.post_layernorm(vision.features).to(clip.dtype))
    tokens = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                       max_length=clip.config.text_config.max_position_embeddings).to(device)  # fmt: skip
    text = clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    text = getattr(text, "pooler_output", text)
    return image, text[:, None, :]


@register_method
@dataclass
class CDPruner(VisionPruner):
    """Args:
        budget: T, visual tokens kept: a budget (see `VisionPruner`; default 64 / 576).
        clip_model: path or id of a CLIPModel matching the vision tower (its tokenizer saved with it), for the
            paper's relevance; None: relevance from the language model's input embeddings (see module docstring).
        vision_layer: see `VisionPruner` (the tower records it; CDPruner itself reads the features only).
    """

    name = "cdpruner"
    clip_model: str | None = None

    CONTRACT_NEUTRAL = {"budget": 16}
    CONTRACT_ACTING = {"budget": 5}
    CONTRACT_INVALID = {"budget": 0, "clip_model": ""}
    CONTRACT_MASKABLE = True

    def __post_init__(self):
        super().__post_init__()
        if self.clip_model is not None and not (isinstance(self.clip_model, str) and self.clip_model):
            self.fail("clip_model", "must be None or a CLIPModel path / id")

    def relevance(self, ctx: PruneContext, visual: torch.Tensor) -> torch.Tensor:
        rows, real = text_after_image(ctx.layout)  # at layer 0 the layout is the prompt's
        if self.clip_model is None:
            return instruction_relevance(visual, gather_tokens(ctx.hidden, rows), real)
        clip, clip_tokenizer = load_clip(self.clip_model)
        ids = ctx.vision.input_ids.gather(1, rows).masked_fill(~real, 0)
        texts = [load_tokenizer(ctx.vision.name_or_path).decode(row[keep], skip_special_tokens=True)
                 for row, keep in zip(ids, real)]  # fmt: skip
        with torch.no_grad():
            image, text = clip_embeddings(clip, clip_tokenizer, ctx.vision, texts)
        return instruction_relevance(image, text, torch.ones(text.shape[:2], dtype=torch.bool, device=text.device))

    def select(self, ctx: PruneContext) -> torch.Tensor:
        visual = gather_tokens(ctx.hidden, ctx.layout.visual_slots)  # (B, V, D) the projected features
        relevance = self.relevance(ctx, visual)
        ctx.scores = relevance
        chosen = dpp_greedy_map(conditional_kernel(visual, relevance), ctx.stage.keep)
        ctx.details["relevance_filled"] = (chosen < 0).sum(dim=1).tolist()  # per row: slots past the kernel's rank
        return fill_by_relevance(chosen, relevance)
