"""The stages of RCPP + DRCD as small pure functions on tensors.

Stage numbers follow the seven steps of the RCPP + DRCD method's core mechanism:
  1 reasoning state, 2 reasoning-aware reconstruction, 3 instant consistency, 4 EMA accumulation,
  5 grouping, 6 DRCD fusion (+ adaptive plausibility constraint), 7 schedule (see `schedule.py`).
Shapes: B = batch, V = visual tokens of the image, Vc = visual tokens still cached, Ls = scoring layers, D = hidden.
"""

from __future__ import annotations

import torch


def reasoning_state(last_hidden_state: torch.Tensor, row: int) -> torch.Tensor:
    """Stage 1 — h_t: the last layer's (final-normed) hidden state of the main query row, i.e. what
    `hidden_states[-1][:, -1, :]` holds.  (B, Q, D) -> (B, D), in float32."""
    return last_hidden_state[:, row, :].float()


def reconstruct_visual_tokens(
    alpha: torch.Tensor, visual_states: torch.Tensor, visual_gram: torch.Tensor, h_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 — recon_i = sum_l alpha[t, i, l] * v_i[l], kept in factored form.

    Stage 3 needs only recon_i's projection on h_t and its norm:
        <recon_i, h_t> = sum_l alpha[t, i, l] * <v_i[l], h_t>
        ||recon_i||^2  = alpha_i^T G_i alpha_i,  G_i[l, m] = <v_i[l], v_i[m]>  (fixed after prefill)
    so each step reads the states once (one matrix-vector product) and never builds the (B, Vc, D) reconstructions.

    Args:
        alpha: (B, Ls, Vc) head-averaged attention probability of the current query on each cached visual token.
        visual_states: (B, Vc, Ls, D) v_i[l].
        visual_gram: (B, Vc, Ls, Ls) G_i, float32.
        h_t: (B, D) float32.
    Returns:
        projection (B, Vc) and norm (B, Vc) of recon_i, float32.
    """
    batch, num_visual, num_layers, hidden = visual_states.shape
    weights = alpha.transpose(1, 2)  # (B, Vc, Ls)
    per_layer = torch.bmm(visual_states.view(batch, num_visual * num_layers, hidden), h_t.to(visual_states.dtype)[:, :, None])
    projection = (weights * per_layer.view(batch, num_visual, num_layers).float()).sum(-1)
    squared_norm = (weights[:, :, None, :] @ visual_gram @ weights[:, :, :, None]).view(batch, num_visual)
    return projection, squared_norm.clamp_min(0.0).sqrt()


def instant_consistency(
    projection: torch.Tensor, recon_norm: torch.Tensor, h_t: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Stage 3 — s_i_t = cos(h_t, recon_i) = <recon_i, h_t> / (||recon_i|| ||h_t||).  (B, Vc), (B, Vc), (B, D) ->
    (B, Vc), clamped to [-1, 1] so that tau = -1 really puts every token in C."""
    return (projection / (recon_norm * h_t.norm(dim=-1, keepdim=True)).clamp_min(eps)).clamp(-1.0, 1.0)


def accumulate_consistency(scores: torch.Tensor | None, instant: torch.Tensor, gamma: float) -> torch.Tensor:
    """Stage 4 — S = gamma * S + (1 - gamma) * s, with S initialised to s at the first step (`scores is None`)."""
    if scores is None:
        return instant.clone()
    return gamma * scores + (1.0 - gamma) * instant


def grouping_threshold(scores: torch.Tensor, tau: float, tau_mode: str) -> torch.Tensor | float:
    """Stage 5's threshold per row, read from tau (`RCPPGenerationConfig.tau_mode`): "absolute" tau itself;
    "quantile" the tau-quantile of the row's S (interpolation "lower": one of the row's scores, the
    floor(tau * (n - 1))-th smallest); "std" mean(S) - tau * std(S) (population std). Relative forms make tau mean
    the same on models whose cosines sit at different scales. NaN scores (tokens evicted or masked out) take no
    part.  (B, Vc) -> float or (B, 1)."""
    if tau_mode == "absolute":
        return tau
    if tau_mode == "quantile":
        return torch.nanquantile(scores, tau, dim=1, keepdim=True, interpolation="lower")
    if tau_mode == "std":
        mean = scores.nanmean(dim=1, keepdim=True)
        std = (scores - mean).square().nanmean(dim=1, keepdim=True).sqrt()
        return mean - tau * std
    raise ValueError(f"unknown tau_mode {tau_mode!r}; expected 'absolute', 'quantile' or 'std'")


def group_visual_tokens(scores: torch.Tensor, tau: float, tau_mode: str = "absolute") -> torch.Tensor:
    """Stage 5 — membership of the core set C = {S >= threshold}; N is its complement (a NaN score is
    never in C).  (B, Vc) -> bool (B, Vc)."""
    return scores >= grouping_threshold(scores, tau, tau_mode)


def select_evictions(scores: torch.Tensor, num_evict: int) -> torch.Tensor:
    """Stage 7 — the `num_evict` lowest-scoring cached visual tokens of each row: N's tokens first, since they are
    the ones below tau; C's lowest only if the budget demands more than |N|.  (B, Vc) -> column indices (B, k)."""
    return torch.topk(scores, num_evict, dim=-1, largest=False, sorted=False).indices


def drcd_fuse(logits_core: torch.Tensor, logits_noise: torch.Tensor, lambda_t: torch.Tensor) -> torch.Tensor:
    """Stage 6 — final_logits = logits_C - lambda_t * logits_N.  (B, vocab), (B, vocab), (B,) -> (B, vocab).
    Rows whose N is empty get lambda_t = 0 from the caller."""
    return logits_core - lambda_t[:, None] * logits_noise


def adaptive_plausibility(final_logits: torch.Tensor, logits_core: torch.Tensor, beta: float) -> torch.Tensor:
    """Stage 6 (optional) — VCD's adaptive plausibility constraint: tokens whose probability under the core branch
    is below beta * max keep no mass (-inf).  (B, vocab) -> (B, vocab)."""
    probs = logits_core.softmax(dim=-1)
    implausible = probs < beta * probs.max(dim=-1, keepdim=True).values
    return final_logits.masked_fill(implausible, float("-inf"))
