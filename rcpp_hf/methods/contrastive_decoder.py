"""Contrastive decoders: the peers of RCPP + DRCD that decode from a fused pair of logits (VCD, SID) and the
plausibility-cutoff control, one mechanism for all of them.

Per decoding step a `ContrastiveDecoder` with a contrast branch runs two forwards, each branch with its own
`VisualKVCache` and its own prompt forward (VCD: the image with diffusion noise; SID: the same prompt whose branch
keeps only the least-attended visual tokens after an early layer), then
    fused = (1 + alpha) * l(v) - alpha * l(v')          (VCD, Leng et al. 2024, eq. 3; `vcd_utils/vcd_sample.py`)
    fused[p(v) < beta * max p(v)] = -inf               (VCD's adaptive plausibility constraint, eq. 4)
and the fused logits go through the logits processors and the token choice exactly as transformers' `_sample`.
The main branch is the generate loop's own (its forward, its cache); the contrast branch runs beside it in the
decoder's `ContrastState`. The first token, too, comes from fused logits (both prefills end at the last prompt
token). A decoder without a contrast branch (the plausibility cutoff alone) applies only the cutoff.
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap, decode_token, run_decoder
from rcpp_hf.families.base import ModelFamily
from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.methods.protocol import GenerateContext, MethodState
from rcpp_hf.rcpp.stages import adaptive_plausibility, drcd_fuse


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

    def check_weights(self) -> None:
        """Validate `alpha` and `plausibility_beta` (ValueError naming the field)."""
        alpha = self.alpha
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha < float("inf")):
            self.fail("alpha", "the contrast weight must be a finite number >= 0")
        beta = self.plausibility_beta
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
            self.fail("plausibility_beta", "the cutoff must lie in [0, 1] (0 keeps every token)")

    def contrast_embeds(self, family: ModelFamily, input_ids: torch.LongTensor, model_kwargs: dict,
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

    def start(self, ctx: GenerateContext) -> "ContrastState":
        return ContrastState(self, ctx)


class ContrastState(MethodState):
    """A contrastive decoder in one `generate` call: the contrast branch (its own `VisualKVCache`, its own prompt
    forward, one single-row forward per token) and the fusion of its logits with the main branch's."""

    def __init__(self, method: ContrastiveDecoder, ctx: GenerateContext):
        self.method, self.ctx = method, ctx
        self.cache = VisualKVCache(config=ctx.family.model.config) if method.has_contrast else None
        self.logits: torch.Tensor | None = None  # (B, vocab) the contrast branch's, for the next token

    def after_prefill(self, ctx: GenerateContext) -> None:
        if self.cache is None:
            return
        embeds = self.method.contrast_embeds(ctx.family, ctx.input_ids, ctx.model_kwargs, ctx.embeds)
        taps = self.method.contrast_taps(ctx.language_model, ctx.num_visual)
        hidden, _ = run_decoder(ctx.language_model, embeds, ctx.layout, self.cache, taps=taps)
        self.logits = ctx.family.logits(hidden[:, -1])

    def next_token_logits(self, step, logits, hidden, chosen):
        return self.method.fuse(chosen, self.logits)

    def after_decode(self, tokens: torch.LongTensor, position_ids: torch.LongTensor) -> None:
        if self.cache is not None:
            hidden = decode_token(self.ctx.language_model, tokens[:, None], position_ids, self.cache)
            self.logits = self.ctx.family.logits(hidden[:, -1])

    def outputs(self) -> dict:
        return {"contrast_past_key_values": self.cache}
