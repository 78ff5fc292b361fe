"""Deepen a trained ShapesWorld LLaVA without changing what it computes: block expansion.

LLaMA Pro (Wu et al., 2024, "LLaMA Pro: Progressive LLaMA with Block Expansion", section 3) deepens a
trained decoder by inserting new blocks whose output projections (attention `o_proj`, MLP `down_proj`)
are zero: a pre-norm residual block with both zeroed adds nothing to the residual stream, so the
expanded model's logits equal the source model's exactly, and training continues from the source's
competence instead of from noise. The new blocks' other weights are the target model's own seeded
initialisation; they receive gradient as soon as the zeroed projections move.

LLaMA Pro appends one new block after each group of source blocks; here each source block keeps its
order and is followed by `num_target / num_source - 1` new ones (4 -> 12: source blocks at 0, 3, 6, 9).
The vision tower, projector and final norm are copied as is. The embeddings and the LM head are copied
row by row by token string, because the source may have been trained with an earlier ShapesWorld
tokenizer (v1 knew no count, colour or position words): a token both vocabularies hold keeps its
trained rows, a new one keeps the target's initialisation. On text both tokenizers split alike, the
expanded model's logits over the shared tokens equal the source's.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration


def source_positions(num_source: int, num_target: int) -> list[int]:
    """Where the source decoder's blocks go in the expanded decoder: `source_positions(4, 12) == [0, 3, 6, 9]`."""
    if num_source < 1 or num_target % num_source:
        raise ValueError(f"a {num_source}-layer decoder cannot be expanded evenly to {num_target} layers")
    group = num_target // num_source
    return [i * group for i in range(num_source)]


def _check_shapes(source: LlavaForConditionalGeneration, target: LlavaForConditionalGeneration) -> None:
    shapes = {
        "text_config": ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"),
        "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                          "patch_size"),
    }  # fmt: skip
    for part, names in shapes.items():
        src, tgt = getattr(source.config, part), getattr(target.config, part)
        for name in names:
            if getattr(src, name) != getattr(tgt, name):
                raise ValueError(f"{part}.{name} differs: source {getattr(src, name)}, target {getattr(tgt, name)}")


def shared_token_rows(source_vocab: dict[str, int], target_vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the tokens both vocabularies hold, as (source ids, target ids), in target id order."""
    shared = sorted((target_vocab[token], source_vocab[token]) for token in source_vocab.keys() & target_vocab.keys())
    if not shared:
        raise ValueError("the source and target vocabularies share no token")
    target_ids, source_ids = zip(*shared)
    return torch.tensor(source_ids), torch.tensor(target_ids)


@torch.no_grad()
def expand_decoder(
    source: LlavaForConditionalGeneration,
    target: LlavaForConditionalGeneration,
    source_vocab: dict[str, int],
    target_vocab: dict[str, int],
) -> LlavaForConditionalGeneration:
    """Copy `source` into the deeper `target` (same widths, `target` freshly initialised), in place; returns `target`.

    `source_vocab` / `target_vocab` map token strings to ids (`tokenizer.get_vocab()`). After the call,
    `target(ids).logits[..., t]` equals `source(ids').logits[..., s]` exactly for every shared token (s, t), where
    ids' is ids mapped to the source's: the new blocks add zeros.
    """
    _check_shapes(source, target)
    source_ids, target_ids = shared_token_rows(source_vocab, target_vocab)
    source_layers = source.model.language_model.layers
    target_layers = target.model.language_model.layers
    positions = source_positions(len(source_layers), len(target_layers))
    by_token = [(source.get_input_embeddings().weight, target.get_input_embeddings().weight),
                (source.lm_head.weight, target.lm_head.weight)]
    for source_rows, target_rows in by_token:
        target_rows[target_ids] = source_rows[source_ids]
    skipped = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    target_tensors = dict(target.named_parameters()) | dict(target.named_buffers())
    for name, value in source.state_dict().items():
        if name not in skipped and not name.startswith("model.language_model.layers."):
            target_tensors[name].copy_(value)
    for index, layer in enumerate(target_layers):
        if index in positions:
            layer.load_state_dict(source_layers[positions.index(index)].state_dict())
        else:  # a new block: identity at the start (LLaMA Pro, eq. 4)
            for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                projection.weight.zero_()
                if projection.bias is not None:
                    projection.bias.zero_()
    return target
