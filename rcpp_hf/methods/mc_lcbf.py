"""MC-LCBF (Memory-Consistent Linear Control Barrier Functions): dual-phase attention-barrier steering of the
residual stream by a closed-form control-barrier-function step (the control law of its author's write-up, a
first-order Taylor linearisation of the barrier; "the reference code" below is the author's decoder-layer wrapper).

For each steered layer and each target row (prefill: the last prompt token, which decides a yes/no answer; decode:
every generated token), with x the residual stream entering the layer at that row:
    q    = RoPE(q_proj(input_layernorm(x)))                       the layer's own query for x
    keys = the layer's keys: the prompt's (k_proj + RoPE of the same normed states) at prefill, its cache at decode
    h(x) = mean over heads of the softmax mass q puts on the row's image tokens    ("softmax" barrier)
           (or, at decode, the reference code's "energy" barrier: mean over heads and image tokens of scaled q.k)
    if h < tau:  theta = min((tau - h) / (||grad_x h||^2 + eps), max_scale) * grad_x h,   x <- x + alpha * theta
before the layer runs, so the layer computes and caches the corrected row. The keys are held fixed while
differentiating (the reference code computes them under no_grad); h and its gradient are computed in float32
whatever the model's dtype, under `enable_grad` (and outside `inference_mode`), since `generate` runs without
autograd.

Deviations from the reference code, each a reason it changed nothing (README "MC-LCBF"): h, the step and the clamp
are per row (the reference code averages h over the batch and takes one global step); the image tokens come from
`image_token_id` per row (the reference code assumes [1, 577)); keys come from this generate call's cache, not from
a `past_key_value` argument that transformers 5.23 no longer passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rcpp_hf.engine.attention import attention_probs, probe_query, prompt_keys
from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.engine.decoder import DecoderTap
from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.pruning import scale_layer
from rcpp_hf.methods.registry import register_method
from rcpp_hf.methods.steering import SteeringMethod

STEER_LAYERS = (10, 27)  # first and last steered layer of a 32-layer decoder: the reference code's range(10, 28)
BARRIERS = ("softmax", "energy")
PHASES = ("prefill", "decode")


# -- the reference code's steps, as pure functions ---------------------------------------------------------------------
def image_attention_mass(probs: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The reference code's step 5, the softmax barrier: h = mean over heads of the attention mass on image keys.
    probs (B, H, q, K), image (B, K) bool -> (B, q)."""
    return (probs * image[:, None, None, :]).sum(-1).mean(1)


def image_attention_energy(query: torch.Tensor, keys: torch.Tensor, scaling: float, image: torch.Tensor) -> torch.Tensor:
    """The reference code's "energy" barrier (its docstring's Phase 2): mean over heads and image keys of the raw
    scaled q.k. query (B, H, q, d), keys (B, H_kv, K, d), image (B, K) bool -> (B, q)."""
    groups = query.shape[1] // keys.shape[1]
    logits = torch.matmul(query, keys.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling  # (B, H, q, K)
    per_head = (logits * image[:, None, None, :]).sum(-1) / image.sum(-1).clamp_min(1)[:, None, None]
    return per_head.mean(1)


def barrier_step(h: torch.Tensor, grad: torch.Tensor, tau: float, max_scale: float, eps: float) -> torch.Tensor:
    """The write-up's control law, the closed-form solution of min ||theta||^2 s.t. h + grad . theta >= tau, with the
    reference code's clamp:
    theta = min((tau - h) / (||grad||^2 + eps), max_scale) * grad where h < tau, else 0.
    h (B, q), grad (B, q, D) -> theta (B, q, D)."""
    scale = ((tau - h) / (grad.pow(2).sum(-1) + eps)).clamp(max=max_scale)
    return torch.where((h < tau)[..., None], scale[..., None] * grad, torch.zeros_like(grad))


def autograd_ready(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor made under `inference_mode` (autograd refuses to save those), else the tensor itself."""
    return tensor.clone() if tensor.is_inference() else tensor


# -- the method ------------------------------------------------------------------------------------------------------
@register_method
@dataclass
class MCLCBF(SteeringMethod):
    """Args:
        layers: steered decoder layers (None: 10-27 of 32, scaled by depth, `scale_layer`; 4-10 on a 12-layer decoder).
        prefill / decode: whether each phase steers.
        prefill_tau, prefill_alpha: the barrier level and gain at prefill (the last prompt token).
        decode_tau, decode_alpha: the same for every generated token.
        decode_barrier: "softmax" (image attention mass) or "energy" (the reference code's raw q.k mass) at decode.
        max_scale: the clamp of the step coefficient (tau - h) / (||grad||^2 + eps) (the reference code's 0.5).
        eps: added to ||grad||^2.
    Defaults are the reference code's STEERING_CONFIG.
    """

    name = "mc_lcbf"
    layers: tuple[int, ...] | None = None
    prefill: bool = True
    prefill_tau: float = 0.2
    prefill_alpha: float = 1.0
    decode: bool = True
    decode_tau: float = 0.2
    decode_alpha: float = 0.5
    decode_barrier: str = "softmax"
    max_scale: float = 0.5
    eps: float = 1e-6

    CONTRACT_NEUTRAL = {"prefill": False, "decode": False}
    CONTRACT_ACTING = {"prefill_tau": 0.6, "decode_tau": 0.6}  # the anyres tiny models put 0.2 on their image
    CONTRACT_INVALID = {"prefill_tau": 1.5, "decode_barrier": "dot"}

    def __post_init__(self):
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                self.fail("layers", "must be None or a non-empty list of layer indices >= 0")
        for flag in PHASES:
            if not isinstance(getattr(self, flag), bool):
                self.fail(flag, "must be true or false")
        for phase in PHASES:
            tau, alpha = f"{phase}_tau", f"{phase}_alpha"
            energy = phase == "decode" and self.decode_barrier == "energy"
            if not isinstance(getattr(self, tau), (int, float)) or not (energy or 0 <= getattr(self, tau) <= 1):
                self.fail(tau, "must lie in [0, 1] (a share of attention mass)" if not energy else "must be a number")
            if not isinstance(getattr(self, alpha), (int, float)) or getattr(self, alpha) < 0:
                self.fail(alpha, "must be a number >= 0")
        if self.decode_barrier not in BARRIERS:
            self.fail("decode_barrier", f"must be one of {BARRIERS}")
        if not (isinstance(self.max_scale, (int, float)) and self.max_scale > 0):
            self.fail("max_scale", "must be a number > 0")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            self.fail("eps", "must be a number > 0")

    def steered_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers steered on a decoder of `num_layers` layers; raises when one is out of range."""
        if self.layers is None:
            first, last = (scale_layer(layer, num_layers) for layer in STEER_LAYERS)
            return tuple(range(first, last + 1))
        if max(self.layers) >= num_layers:
            self.fail("layers", f"names a layer out of range for a decoder with {num_layers} layers "
                                f"(valid: 0..{num_layers - 1})")  # fmt: skip
        return tuple(sorted(set(self.layers)))

    def tap(self, language_model: torch.nn.Module, cache: VisualKVCache) -> "MCLCBFTap":
        return MCLCBFTap(self, language_model, cache)


@dataclass
class SteerRecord:
    """One steered forward of one layer, per target row (B, q): the barrier before the step, ||grad_x h||, and the
    norms of the correction alpha * theta and of the residual x it was added to."""

    phase: str
    layer: int
    h: torch.Tensor
    grad_norm: torch.Tensor
    delta_norm: torch.Tensor
    x_norm: torch.Tensor
    steered: torch.Tensor = field(repr=False)  # (B, q) bool: h < tau


class MCLCBFTap(DecoderTap):
    """Runs `MCLCBF` inside `run_decoder`, in both phases of one generate call; `records` holds a `SteerRecord` per
    steered layer and forward."""

    def __init__(self, method: MCLCBF, language_model: torch.nn.Module, cache: VisualKVCache):
        self.method = method
        self.language_model = language_model
        self.cache = cache
        self.layers = frozenset(method.steered_layers(language_model.config.num_hidden_layers))
        self.records: list[SteerRecord] = []

    def before_layer(self, layer_idx, hidden, layout):
        prefill = not self.cache.layouts
        phase = "prefill" if prefill else "decode"
        if layer_idx not in self.layers or not getattr(self.method, phase):
            return None
        tau, alpha = getattr(self.method, f"{phase}_tau"), getattr(self.method, f"{phase}_alpha")
        layer = self.language_model.layers[layer_idx]
        with torch.inference_mode(False), torch.enable_grad():
            states = autograd_ready(hidden).float()
            rotary = self.language_model.rotary_emb(states, position_ids=layout.rope_positions)
            cos, sin = (autograd_ready(t) for t in rotary)
            if prefill:  # the last prompt token against the prompt's keys (left padding: the last column)
                if layout.num_visual == 0:
                    raise ValueError("mc_lcbf needs image tokens in every prompt row; this prompt has none")
                keys = prompt_keys(layer, states, cos, sin).detach()
                keys_layout, states, cos, sin = layout, states[:, -1:], cos[:, -1:], sin[:, -1:]
            else:  # every query row against what this layer has cached
                keys, keys_layout = autograd_ready(self.cache.layers[layer_idx].keys).float(), self.cache.layouts[layer_idx]
            x = states.detach().requires_grad_(True)
            h = self.barrier(layer, x, cos, sin, keys, keys_layout, phase)
            (grad,) = torch.autograd.grad(h.sum(), x)  # rows are independent: d(sum h)/dx_row = dh_row/dx_row
        theta = barrier_step(h.detach(), grad, tau, self.method.max_scale, self.method.eps)
        delta = alpha * theta
        self.records.append(SteerRecord(phase, layer_idx, h.detach(), grad.norm(dim=-1), delta.norm(dim=-1),
                                        x.detach().norm(dim=-1), h.detach() < tau))  # fmt: skip
        if prefill:
            delta = torch.cat([delta.new_zeros(delta.shape[0], hidden.shape[1] - 1, delta.shape[2]), delta], dim=1)
        return (hidden.float() + delta).to(hidden.dtype), layout

    def barrier(self, layer, x, cos, sin, keys: torch.Tensor, keys_layout: TokenLayout, phase: str) -> torch.Tensor:
        """h(x) (B, q) of the rows x (B, q, D) against `keys` (B, H_kv, K, d), float32, differentiable in x."""
        query = probe_query(layer, x, cos, sin)
        image = keys_layout.visual_ids >= 0
        if phase == "decode" and self.method.decode_barrier == "energy":
            return image_attention_energy(query, keys, layer.self_attn.scaling, image)
        key_mask = keys_layout.valid[:, None, :].expand(-1, x.shape[1], -1)  # the last row / new rows see every entry
        return image_attention_mass(attention_probs(query, keys, layer.self_attn.scaling, key_mask), image)
