"""The two-pass contrastive reference: DRCD's fusion computed VCD-style, with two caches and two forwards per token.

It exists to show, side by side, what the one-forward design of DRCD saves. Its grouping is fixed (every other visual
token in C): scoring would only add to its cost, so the measured overhead is a lower bound for a two-pass method.
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.rcpp.masks import drcd_attention_mask
from rcpp_hf.rcpp.stages import drcd_fuse


@torch.no_grad()
def two_pass_contrastive_generate(model, inputs: dict, max_new_tokens: int, lambda_t: float, streamer=None):
    """Greedy decoding of exactly `max_new_tokens` tokens with `logits_C - lambda_t * logits_N`, each branch with its
    own `VisualKVCache` and its own forward.  Returns (sequences (B, S + n), main cache)."""
    input_ids = inputs["input_ids"]
    batch = input_ids.shape[0]
    attention_mask = inputs.get("attention_mask", torch.ones_like(input_ids))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    image_mask = input_ids == model.config.image_token_id
    if streamer is not None:
        streamer.put(input_ids.cpu())

    caches, logits = [], []
    for _ in range(2):  # one prefill per branch, like VCD's second (distorted-image) branch
        cache = VisualKVCache(config=model.config)
        hidden = model.model(**inputs, position_ids=position_ids, past_key_values=cache, use_cache=True)
        cache.register_prompt(position_ids, attention_mask.bool(), image_mask)
        caches.append(cache)
        logits.append(model.lm_head(hidden.last_hidden_state[:, -1]).float())
    core = torch.zeros(batch, caches[0].num_visual_tokens, dtype=torch.bool, device=input_ids.device)  # by visual id
    core[:, ::2] = True

    next_tokens = logits[0].argmax(-1)  # like RCPP, the first token comes from the plain prefill logits
    generated = [next_tokens]
    position = position_ids[:, -1:]
    for _ in range(max_new_tokens - 1):
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        position = position + 1
        branch_logits = []
        for cache, group in zip(caches, (core, ~core)):
            mask = drcd_attention_mask(cache.valid, cache.visual_ids, group, ~group, 1)
            hidden = model.model(
                input_ids=next_tokens[:, None], attention_mask=mask, position_ids=position,
                past_key_values=cache, use_cache=True,
            ).last_hidden_state
            cache.append_entries(position)
            branch_logits.append(model.lm_head(hidden[:, -1]).float())
        lambdas = torch.full((batch,), lambda_t, device=input_ids.device)
        next_tokens = drcd_fuse(branch_logits[0], branch_logits[1], lambdas).argmax(-1)
        generated.append(next_tokens)
    if streamer is not None:
        streamer.put(next_tokens.cpu())
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1), caches[0]
