"""The plausibility-cutoff control: VCD's adaptive plausibility constraint alone, on the plain logits, no contrast.

Keeps only tokens with p >= beta * max p (Leng et al. 2024, eq. 4; Li et al., "Contrastive Decoding", 2023), one
forward per token. Much of the POPE gain credited to contrast comes from this cutoff (Yin et al., "The Mirage of
Performance Gains: Why Contrastive Decoding Fails to Mitigate Object Hallucinations in MLLMs?", 2025,
arXiv:2504.10020), so a table of VCD / SID shows it beside them. Under greedy decoding
without logits processors it changes nothing (the most probable token always survives); it acts on sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

from rcpp_hf.methods.contrastive_decoder import ContrastiveDecoder
from rcpp_hf.methods.registry import register_method


@register_method
@dataclass
class PlausibilityCutoff(ContrastiveDecoder):
    """Args:
        plausibility_beta: tokens with p < beta * max p are excluded, in [0, 1] (0: decoding unchanged).
    """

    name = "plausibility_cutoff"
    has_contrast = False
    plausibility_beta: float = 0.1
    alpha = 0.0  # no contrast branch (a class attribute, not a setting)

    CONTRACT_NEUTRAL = {"plausibility_beta": 0.0}
    CONTRACT_INVALID = {"plausibility_beta": 1.5}

    def __post_init__(self):
        self.check_weights()
