"""The training forward: the frozen LLaVA over a packed training batch, the pruners' masks applied as an attention
policy on the visual keys from each pruning layer on (cumulative over the stages), text hidden states of chosen
layers kept for the discriminator.

With binary masks it computes what the physically pruned prefill computes (`engine/pruning.py`: the dropped
tokens' keys and values gone from that layer on, the rest at their original positions): the same attention
probabilities over the same entries (tested in float32). Dropped tokens still run as queries here (their rows are
never read), which is where training spends more than inference. With a token merger (`merger.py`) its M tokens
are written into their places at the decoder's input and the image's other tokens get policy 0 from layer 0 on:
the evaluation's layer-0 stage that replaces the image by the merged tokens (`method.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rcpp_hf.engine.layout import first_true_columns
from rcpp_hf.engine.vision import gather_tokens
from rcpp_hf.gan_training.attention import policy_attention
from rcpp_hf.methods.gan_pruner.attention_residual import question_attention_feature
from rcpp_hf.methods.gan_pruner.merger import merge_columns

# (stage index, visual (B, V, D), question (B, T, D), question_valid (B, T), attention feature (B, V) or None)
# -> (mask, soft), each (B, V)
StageMasks = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]
# (visual (B, V, D), question (B, T, D), question_valid (B, T)) -> merged tokens (B, M, D)
Merge = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PrunedForward:
    """What `pruned_forward` returns.

    Attributes:
        logits: (B, L, vocab) float32.
        layer_states: decoder layer index -> its output (B, L, D), for the layers asked for.
        keep: per stage, the cumulative mask (B, V) in force from its layer on (product of the stages so far).
        samples: per stage, the relaxed Gumbel sample (B, V) (equal to the mask in "relaxed" mode).
    """

    logits: torch.Tensor
    layer_states: dict[int, torch.Tensor] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)


def pruned_forward(
    model,
    batch: dict[str, torch.Tensor],
    stage_layers: tuple[int, ...],
    stage_masks: StageMasks | None = None,
    state_layers: tuple[int, ...] = (),
    merge: Merge | None = None,
    attention_residual: bool = False,
) -> PrunedForward:
    """One forward of `model` (an `RCPPLlavaForConditionalGeneration`) over `batch`.

    Args:
        batch: input_ids (B, L), pixel_values, attention_mask (B, 1, L, L) bool, position_ids (B, L), question_mask
            (B, L) bool (the prompt's text after the image: what the pruners read as the question).
        stage_layers: the decoder layers before which `stage_masks` is asked for a mask.
        stage_masks: None for the unpruned forward.
        state_layers: decoder layers whose outputs to keep.
        merge: the token merger, or None: its M tokens take the places of `merge_columns(V, M)` before layer 0,
            the image's other tokens are dropped (policy 0) from there on, and the stages act on the merged tokens.
        attention_residual: give `stage_masks` the question's attention to the visual tokens at each pruning layer
            (`attention_residual.py`, under the policy of the earlier stages); else None.
    """
    language_model = model.model.language_model
    input_ids, position_ids, attention_mask = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
    image = input_ids == model.config.image_token_id
    visual_slots = first_true_columns(image, int(image[0].sum()))
    question_slots = first_true_columns(batch["question_mask"], int(batch["question_mask"].sum(1).max()))
    question_valid = batch["question_mask"].gather(1, question_slots)

    hidden = model.family.embed_prompt(input_ids, {"pixel_values": batch["pixel_values"]})
    position_embeddings = language_model.rotary_emb(hidden, position_ids=position_ids)
    out, policy = PrunedForward(logits=torch.empty(0)), None
    # The policy outside the stages' masks: 1 for text and, without a merger, for every visual entry.
    present = torch.ones(image.shape, dtype=torch.float32, device=hidden.device)
    if merge is not None:
        merged = merge(gather_tokens(hidden, visual_slots), gather_tokens(hidden, question_slots), question_valid)
        visual_slots = visual_slots[:, merge_columns(visual_slots.shape[1], merged.shape[1], hidden.device)]
        hidden = hidden.scatter(1, visual_slots[:, :, None].expand_as(merged), merged.to(hidden.dtype))
        policy = present = present.masked_fill(image, 0.0).scatter(1, visual_slots, 1.0)
    question_keys = attention_mask[:, 0].gather(1, question_slots[:, :, None].expand(-1, -1, image.shape[1]))
    layers = language_model.layers[: language_model.config.num_hidden_layers]
    with policy_attention(language_model):
        for layer_idx, layer in enumerate(layers):
            if stage_masks is not None and layer_idx in stage_layers:
                visual, question = gather_tokens(hidden, visual_slots), gather_tokens(hidden, question_slots)
                attention = None
                if attention_residual:
                    attention = question_attention_feature(layer, hidden, position_embeddings, question_slots,
                                                           question_valid, question_keys, visual_slots, policy)  # fmt: skip
                mask, soft = stage_masks(stage_layers.index(layer_idx), visual, question, question_valid, attention)
                out.keep.append(mask if not out.keep else out.keep[-1] * mask)
                out.samples.append(soft)
                policy = present.to(mask.dtype).scatter(1, visual_slots, out.keep[-1])
            hidden = layer(
                hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                key_policy=policy,
            )
            if layer_idx in state_layers:
                out.layer_states[layer_idx] = hidden
    out.logits = model.lm_head(language_model.norm(hidden)).float()
    return out
