"""Prefill FLOPs of a LLaVA or Qwen-VL model with prefill-pruning stages, the figure the measured prefill ratio of a
pruner is compared with: the model's FLOPs with the tokens the stages keep, plus what the pruner spends choosing
them.

The model (`prefill_flops`, theoretical): every Linear / Conv weight of the vision tower and projector once per token
it sees (2 FLOPs per multiply-add), each decoder layer's Linear weights per token it computes plus causal attention
(2 n^2 (H d): half of QK^T and of AV), and the language-model head for the last token. Left out: norms, activations,
RoPE, embeddings (all linear in tokens and small). The vision tower's cost does not shrink with pruning, so the ratio
is the fraction of the whole prefill that a pruner leaves, not the decoder's alone.

The weights (`weight_bytes`, `flops_per_weight_byte`): a forward reads every weight of every layer once, whatever its
number of tokens. With few tokens (one prompt, a pruned layer) the products cannot hide that read behind their
arithmetic, and the time it takes is a cost per call, not per token. It is counted in FLOP-equivalents: the weight
bytes times the FLOPs the device computes in the time it reads one byte, measured on the device at the start of
the run. The prefill cost (`prefill_cost`) is FLOPs plus those reads, per prompt of the batch.

The choosing (`counting_stage_flops`, counted): a pruner's stages compute what its scores need (attention rows of a
query, a layer's keys recomputed for all entries, similarities between tokens, merged tokens projected again), work
no implementation of the method can skip and that the model's count leaves out. It is counted, not derived, by
torch's FLOP counter (matrix products, attention, convolutions) around each stage of one prefill.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from rcpp_hf.engine.pruning import PrefillPruningTap, PruneStage, visual_tokens_per_layer


def weight_macs(module: torch.nn.Module) -> int:
    """Multiply-adds per token of the module's Linear and Conv weights (a patch embedding counts once per patch)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, WEIGHTED))


WEIGHTED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)


def vision_flops(model, num_visual: int, tiles: int) -> float:
    """FLOPs of the vision side for one image. LLaVA(-NeXT): the tower and projector per patch of each of `tiles`
    tiles (CLIP's CLS included). Qwen-VL (`model.model.visual`, dynamic resolution): the patch embedding and blocks
    per patch (merge_size^2 of them per visual token), the merger's MLP per visual token."""
    vision = model.config.vision_config
    if hasattr(model.model, "visual"):
        tower = model.model.visual
        patches = num_visual * vision.spatial_merge_size**2
        return 2 * ((weight_macs(tower) - weight_macs(tower.merger)) * patches + weight_macs(tower.merger) * num_visual)
    patches = (vision.image_size // vision.patch_size) ** 2
    cls_token = int(vision.model_type == "clip_vision_model")  # SigLIP has none
    kept_cls = cls_token * (model.config.vision_feature_select_strategy == "full")  # "default" drops it
    return 2 * (weight_macs(model.model.vision_tower) * tiles * (patches + cls_token)
                + weight_macs(model.model.multi_modal_projector) * tiles * (patches + kept_cls))  # fmt: skip


def prefill_flops(model, stages: list[PruneStage], num_visual: int, num_text: int, tiles: int = 1) -> float:
    """FLOPs of one prompt's prefill with `stages` (empty: unpruned); `model` a LLaVA(-NeXT) or Qwen-VL
    ForConditionalGeneration whose image is `tiles` tiles (LLaVA-1.5 and Qwen-VL: one; LLaVA-NeXT: the base tile and
    the grid's, `num_visual` then also counting the newline tokens, which neither the tower nor the projector
    computes)."""
    flops = vision_flops(model, num_visual, tiles)
    text_config = model.config.text_config
    attention_width = text_config.num_attention_heads * getattr(
        text_config, "head_dim", text_config.hidden_size // text_config.num_attention_heads
    )
    layers = model.model.language_model.layers
    visual_per_layer = visual_tokens_per_layer({stage.layer: stage.keep for stage in stages}, len(layers), num_visual)
    for layer, visual in zip(layers, visual_per_layer):
        tokens = num_text + visual
        flops += 2 * weight_macs(layer) * tokens + 2 * tokens * tokens * attention_width
    return flops + 2 * weight_macs(model.lm_head)


def prefill_flops_ratio(model, stages: list[PruneStage], num_visual: int, num_text: int) -> float:
    """Prefill FLOPs with `stages` over the unpruned prefill."""
    return prefill_flops(model, stages, num_visual, num_text) / prefill_flops(model, [], num_visual, num_text)


def weight_bytes(model) -> int:
    """Bytes of the weights a prefill reads once whatever its tokens: every Linear / Conv weight of the vision tower,
    projector, decoder layers and language-model head (the embedding table is only indexed)."""
    vision = [model.model.visual] if hasattr(model.model, "visual") else [model.model.vision_tower,
                                                                           model.model.multi_modal_projector]
    parts = [*vision, model.model.language_model.layers, model.lm_head]
    return sum(m.weight.nbytes for part in parts for m in part.modules() if isinstance(m, WEIGHTED))


def flops_per_weight_byte(weights: list[torch.Tensor], rows: int = 512, repeats: int = 5) -> float:
    """FLOPs the device computes in the time it reads one byte of weights, measured on `weights` (each (out, in), e.g.
    every Linear weight of the decoder layers, so that they come from memory as in a forward, not from a cache): a
    one-row product with each reads them and computes next to nothing; a `rows`-row product with the largest one
    computes 2 rows out in FLOPs. Medians of `repeats` timings after one warm-up."""
    largest = max(weights, key=torch.numel)
    one_row = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    many_rows = torch.randn(rows, largest.shape[1], dtype=largest.dtype, device=largest.device)

    def seconds(products) -> float:
        times = []
        for _ in range(repeats + 1):
            synchronize(largest.device)
            start = time.perf_counter()
            for x, weight in products:
                torch.nn.functional.linear(x, weight)
            synchronize(largest.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    read = seconds([(one_row[w.shape[1]], w) for w in weights]) / sum(w.nbytes for w in weights)
    per_flop = seconds([(many_rows, largest)]) / (2 * rows * largest.numel())
    return read / per_flop


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_cost(model, stages: list[PruneStage], num_visual: int, num_text: int, batch_size: int,
                 balance: float, tiles: int = 1) -> float:  # fmt: skip
    """FLOP-equivalents of one prompt's prefill in a batch of `batch_size`: its FLOPs plus its share of the weight
    reads (`weight_bytes`, read once per batch) at `balance` FLOPs per byte (`flops_per_weight_byte`)."""
    return prefill_flops(model, stages, num_visual, num_text, tiles) + balance * weight_bytes(model) / batch_size


@contextmanager
def counting_stage_flops():
    """While active, the yielded list's one entry sums the FLOPs that prefill-pruning stages spend (their `score`,
    `select` and `recycle` and the gather of the kept entries, inside `PrefillPruningTap.before_layer`), counted by
    `FlopCounterMode` over the whole batch. Only for an untimed run: the counter slows every operation it sees."""
    total = [0]
    before_layer = PrefillPruningTap.before_layer

    def counted(tap, layer_idx, hidden, layout):
        with FlopCounterMode(display=False) as counter:
            changed = before_layer(tap, layer_idx, hidden, layout)
        total[0] += counter.get_total_flops()
        return changed

    with mock.patch.object(PrefillPruningTap, "before_layer", counted):
        yield total
