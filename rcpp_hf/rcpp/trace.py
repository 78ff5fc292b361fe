"""Per-step diagnostics of RCPP + DRCD, returned as `out.rcpp` by `generate(..., return_dict_in_generate=True)`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput


@dataclass
class RCPPStep:
    """What the method did at one decoding step (step 0 is the prefill: its token is decoded without contrast, or,
    with `first_token_action`, from the re-run of the last prompt token as DRCD's two rows).

    Attributes:
        scores: (B, V) consistency score S of every visual token of the prompt after this step's update; NaN for
            tokens evicted so far.
        num_core, num_noise: (B,) |C| and |N| used by this step's forward.
        evicted: (B, k) prompt indices (0..V-1) of the visual tokens evicted at this step; k may be 0. Rows whose
            images differ in visual tokens evict different counts: -1 pads a row after its own.
        lambda_t, keep_ratio: the scheduled values of this step (step 0: lambda_end with `first_token_action`,
            else 0).
        contrast: whether this step's token came from a forward with DRCD's contrast row.
        cache_bytes, visual_cache_bytes: KV cache size after this step, total and visual entries only.
        num_protected: (B,) with `evidence_gating`, the tokens not yet consumed when this step's forward was grouped,
            all of them in C (counted in `num_core`); 0 at step 0 unless `first_token_action` groups it. None when
            gating is off.
        protected_evicted: (B,) with `evidence_gating`, how many of this step's evicted tokens were protected: the
            ones the budget forced out because fewer tokens than it needed were eligible. None when gating is off.
    """

    step: int
    scores: torch.Tensor
    num_core: torch.Tensor
    num_noise: torch.Tensor
    evicted: torch.Tensor
    lambda_t: float
    keep_ratio: float
    cache_bytes: int
    visual_cache_bytes: int
    contrast: bool = False
    num_protected: torch.Tensor | None = None
    protected_evicted: torch.Tensor | None = None


@dataclass
class RCPPTrace:
    num_visual_tokens: int
    steps: list[RCPPStep] = field(default_factory=list)

    def stacked_scores(self) -> torch.Tensor:
        """(T, B, V) scores over the steps."""
        return torch.stack([step.scores for step in self.steps])

    def summary(self) -> list[dict]:
        """One plain dict per step (batch row 0 counts), e.g. for a table or JSON. With `evidence_gating` each also
        holds "protected" and "protected_evicted" (`RCPPStep.num_protected`, `.protected_evicted`)."""
        return [
            {
                "step": s.step,
                "core": int(s.num_core[0]),
                "noise": int(s.num_noise[0]),
                "evicted": s.evicted.shape[1],
                "lambda_t": s.lambda_t,
                "keep_ratio": s.keep_ratio,
                "contrast": s.contrast,
                "cache_bytes": s.cache_bytes,
                "visual_cache_bytes": s.visual_cache_bytes,
                **({} if s.num_protected is None else {"protected": int(s.num_protected[0]),
                                                       "protected_evicted": int(s.protected_evicted[0])}),
            }
            for s in self.steps
        ]

    def protected_evictions(self) -> int | None:
        """Over every step and row, how many protected tokens the budget forced out (`evidence_gating`), else None."""
        if not self.steps or self.steps[0].protected_evicted is None:
            return None
        return sum(int(step.protected_evicted.sum()) for step in self.steps)


@dataclass
class RCPPGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` plus what rcpp_hf's methods did: `rcpp`, RCPP's per-step trace (None when RCPP is
    off), `pruning`, one `engine.pruning.PruneRecord` per prefill-pruning stage, and `contrast_past_key_values`, the
    contrast branch's cache of a contrastive decoder (`methods.contrastive_decoder`; None otherwise)."""

    rcpp: RCPPTrace | None = None
    pruning: list | None = None
    contrast_past_key_values: object | None = None
