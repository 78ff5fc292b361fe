"""Decoding methods: methods that act at every decoding step on what the model attends to and on the logits the
token is chosen from, in the main forward itself (RCPP + DRCD, `rcpp.py`).

Their state (`protocol.MethodState`) uses every per-step hook: `after_prefill` (what the prompt's forward
recorded), `next_token_logits` (observe the forward, fuse the logits), `record_step` (the trace), `before_decode`
(schedule, evict from the KV cache, group; how many query rows the next forward has) and the taps of both phases.
"""

from __future__ import annotations

from rcpp_hf.methods.base import MethodConfig


class DecodingMethod(MethodConfig):
    """A method that steers decoding step by step from inside the main forward. Subclasses are dataclasses that
    implement `start`."""

    kind = "decoding"
