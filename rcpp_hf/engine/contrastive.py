"""Contrastive decoders: the peers of RCPP + DRCD that decode from a fused pair of logits (VCD, SID) and the
plausibility-cutoff control, one mechanism for all of them.

Per decoding step a `ContrastiveDecoder` with a contrast branch runs two forwards, each branch with its own
`VisualKVCache` and its own prompt forward (VCD: the image with diffusion noise; SID: the same prompt whose branch
keeps only the least-attended visual tokens after an early layer), then
    fused = (1 + alpha) * l(v) - alpha * l(v')          (VCD, Leng et al. 2024, eq. 3; `vcd_utils/vcd_sample.py`)
    fused[p(v) < beta * max p(v)] = -inf               (VCD's adaptive plausibility constraint, eq. 4)
and the fused logits go through the logits processors and the token choice exactly as transformers' `_sample`.
The first token, too, comes from fused logits (both prefills end at the last prompt token). A decoder without a
contrast branch (the plausibility cutoff alone) runs one forward and applies only the cutoff.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, decode_token, run_decoder
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.token_choice import TokenChoice
from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.rcpp.stages import adaptive_plausibility, drcd_fuse
from rcpp_hf.rcpp.trace import RCPPGenerateOutput


def contrastive_fuse(main: torch.Tensor, contrast: torch.Tensor, alpha: float) -> torch.Tensor:
    """VCD's fusion (1 + alpha) * main - alpha * contrast, DRCD's `logits_C - lambda * logits_N` with C = the main
    branch scaled by 1 + alpha and lambda = alpha.  (B, vocab), (B, vocab) -> (B, vocab)."""
    weights = torch.full((main.shape[0],), alpha, dtype=main.dtype, device=main.device)
    return drcd_fuse((1.0 + alpha) * main, contrast, weights)


class ContrastiveDecoder(MethodConfig):
    """A method that decodes from fused logits. Subclasses are dataclasses with the fields `alpha` (contrast
    weight, >= 0) and `plausibility_beta` (the cutoff, in [0, 1]; 0 keeps every token), and say how their contrast
    branch differs from the main one (`contrast_embeds`, `contrast_taps`); `has_contrast = False` runs the cutoff
    alone."""

    kind = "contrastive_decoder"
    has_contrast = True
    distorts_image: ClassVar[bool] = False  # True: `contrast_embeds` reads model_kwargs["pixel_values"]

    def check_weights(self) -> None:
        """Validate `alpha` and `plausibility_beta` (ValueError naming the field)."""
        alpha = self.alpha
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha < float("inf")):
            self.fail("alpha", "the contrast weight must be a finite number >= 0")
        beta = self.plausibility_beta
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
            self.fail("plausibility_beta", "the cutoff must lie in [0, 1] (0 keeps every token)")

    def contrast_embeds(self, model, input_ids: torch.LongTensor, model_kwargs: dict,
                        embeds: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The contrast branch's prompt embeddings (B, S, D); `embeds` are the main branch's."""
        return embeds

    def contrast_taps(self, language_model: torch.nn.Module, num_visual: int) -> list[DecoderTap]:
        """Taps of the contrast branch's prompt forward (e.g. a prefill pruner)."""
        return []

    def fuse(self, main: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
        """The logits the token is chosen from: (B, vocab) main [and contrast] -> (B, vocab)."""
        fused = main if contrast is None else contrastive_fuse(main, contrast, self.alpha)
        return adaptive_plausibility(fused, main, self.plausibility_beta) if self.plausibility_beta > 0 else fused


class Branch:
    """One decoding branch: its own `VisualKVCache`, one prompt forward, then one single-row forward per token."""

    def __init__(self, model):
        self.model = model
        self.language_model = model.model.language_model
        self.cache = VisualKVCache(config=model.config)

    def prefill(self, embeds: torch.Tensor, layout: TokenLayout, taps: list[DecoderTap] = ()) -> torch.Tensor:
        """The prompt's forward -> logits of its last entry (B, vocab), float32."""
        hidden, _ = run_decoder(self.language_model, embeds, layout, self.cache, taps=taps)
        return self.model.lm_head(hidden[:, -1]).float()

    def step(self, tokens: torch.LongTensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """The forward of the tokens (B,) just chosen at `position_ids` (B, 1) -> next logits (B, vocab), float32."""
        hidden = decode_token(self.language_model, tokens[:, None], position_ids, self.cache)
        return self.model.lm_head(hidden[:, -1]).float()


def check_contrastive(generation_config) -> ContrastiveDecoder | None:
    """The config's contrastive decoder, or None; refuses combining one with RCPP or with another method."""
    decoders = [m for m in generation_config.methods if m.kind == ContrastiveDecoder.kind]
    if not decoders:
        return None
    if generation_config.rcpp:
        raise ValueError(
            f"{decoders[0].name} is a contrastive decoder and does not compose with RCPP + DRCD (both choose the token "
            "from fused logits): use RCPPGenerationConfig(rcpp=False, methods=[...])"
        )
    others = [m.name for m in generation_config.methods if m.kind != ContrastiveDecoder.kind]
    if others:
        raise ValueError(f"{decoders[0].name} is a contrastive decoder and runs alone; got it with {others}")
    return decoders[0]


def contrastive_sample(model, method: ContrastiveDecoder, input_ids, logits_processor, stopping_criteria,
                       generation_config, streamer, model_kwargs: dict, num_visual: int):  # fmt: skip
    """The decoding loop of `method`, greedy or sampling, from `RCPPLlavaForConditionalGeneration._sample`; returns
    what `_sample` returns (`out.past_key_values` is the main branch's cache, `out.contrast_past_key_values` the
    contrast branch's)."""

    valid = model_kwargs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
    position_ids = model_kwargs["position_ids"]
    layout = TokenLayout.prompt(position_ids, valid, input_ids == model.config.image_token_id)
    embeds = model._embed_prompt(input_ids, model_kwargs)
    main = Branch(model)
    logits = main.prefill(embeds, layout)
    contrast, contrast_logits = None, None
    if method.has_contrast:
        contrast = Branch(model)
        contrast_logits = contrast.prefill(
            method.contrast_embeds(model, input_ids, model_kwargs, embeds), layout,
            method.contrast_taps(main.language_model, num_visual),
        )  # fmt: skip

    choice = TokenChoice(generation_config, logits_processor, stopping_criteria, streamer, input_ids)
    while True:
        # The usual processors and token choice, as transformers' `_sample`, on the fused logits.
        next_tokens = choice.next_tokens(input_ids, method.fuse(logits, contrast_logits))
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if choice.done(input_ids, next_tokens):
            break
        position_ids = position_ids[:, -1:] + 1
        logits = main.step(next_tokens, position_ids)
        if contrast is not None:
            contrast_logits = contrast.step(next_tokens, position_ids)

    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return RCPPGenerateOutput(
        sequences=input_ids,
        scores=choice.scores,
        logits=choice.logits,
        past_key_values=main.cache,
        contrast_past_key_values=None if contrast is None else contrast.cache,
        pruning=[],
    )
