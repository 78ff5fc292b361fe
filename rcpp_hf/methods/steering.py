"""Steering: methods that change the residual stream entering decoder layers, at prefill and at every decode step.

A `SteeringMethod` builds one `DecoderTap` per `generate` call (`tap`); that same tap runs in the prompt's forward
and in every decoding forward, after any prefill pruner's. Its `before_layer` returns corrected hidden states for
the layer's input, so the correction enters what the layer computes and caches. The tap tells the phases apart by
the cache: at prefill no layer layout is registered yet (`cache.layouts` is empty).
"""

from __future__ import annotations

import torch

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap
from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.methods.protocol import GenerateContext, MethodState


class SteeringMethod(MethodConfig):
    """A method that corrects hidden states before layers run, in both phases. Subclasses are dataclasses that
    implement `tap`."""

    kind = "steering"

    def tap(self, language_model: torch.nn.Module, cache: VisualKVCache) -> DecoderTap:
        """The tap of one `generate` call: `cache` is the call's (empty at prefill, filled by the decoder)."""
        raise NotImplementedError

    def start(self, ctx: GenerateContext) -> MethodState:
        state = MethodState()
        state.prefill_taps = state.decode_taps = [self.tap(ctx.language_model, ctx.cache)]
        return state
