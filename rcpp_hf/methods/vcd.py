"""VCD, Visual Contrastive Decoding (Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models
through Visual Contrastive Decoding", CVPR 2024; DAMO-NLP-SG/VCD).

The contrast branch sees the same prompt with a distorted image v': the pixel values the processor produced, forward-
noised as a diffusion model's q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) at step `noise_step` of
1000 (`vcd_utils/vcd_add_noise.py`). Its schedule: beta_t = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5,
alpha_bar_t = prod_{s <= t} (1 - beta_s) (a sigmoid-shaped schedule in the official code, not a linear one).
Decoding: (1 + alpha) * l(v) - alpha * l(v') under the adaptive plausibility cutoff (`methods.contrastive_decoder`).
Defaults are the official POPE script's: alpha = 1, noise_step = 500; beta = 0.1 (the evaluation script's default;
the bash script passes 0.2). The noise is drawn from a generator seeded with `seed`, the same for every image of a
batch, so a batch decodes as its rows would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rcpp_hf.methods.contrastive_decoder import ContrastiveDecoder
from rcpp_hf.methods.registry import register_method

DIFFUSION_STEPS = 1000  # `num_steps` of vcd_add_noise.py


def vcd_noise_schedule(num_steps: int = DIFFUSION_STEPS) -> torch.Tensor:
    """alpha_bar_t for t = 0..num_steps-1, float64 (vcd_add_noise.py's `alphas_prod`)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def forward_diffusion(x0: torch.Tensor, alpha_bar: float, noise: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) with a given eps: sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise (vcd_add_noise.py `q_x`)."""
    return alpha_bar ** 0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise


def diffusion_noise(pixel_values: torch.Tensor, noise_step: int, seed: int) -> torch.Tensor:
    """VCD's distorted image: `pixel_values` (N, C, H, W) at diffusion step `noise_step`, with standard normal noise
    drawn in float32 on the CPU from a generator seeded with `seed` (one draw, shared by the N images), so that the
    result does not depend on the device or on the batch."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(pixel_values.shape[1:], generator=generator, dtype=torch.float32)
    noise = noise.to(pixel_values.device)[None].expand_as(pixel_values)
    alpha_bar = float(vcd_noise_schedule()[noise_step])
    return forward_diffusion(pixel_values.float(), alpha_bar, noise).to(pixel_values.dtype)


@register_method
@dataclass
class VCD(ContrastiveDecoder):
    """Args:
        alpha: contrast weight a of (1 + a) l(v) - a l(v'), >= 0 (0 decodes as greedy / plain sampling).
        plausibility_beta: tokens with p(v) < beta * max p(v) are excluded, in [0, 1] (0: no cutoff).
        noise_step: diffusion step of the distorted image, 0..999.
        seed: seed of the noise generator.
    """

    name = "vcd"
    distorts_image = True
    alpha: float = 1.0
    plausibility_beta: float = 0.1
    noise_step: int = 500
    seed: int = 0

    CONTRACT_NEUTRAL = {"alpha": 0.0, "plausibility_beta": 0.0}
    CONTRACT_INVALID = {"alpha": -1.0, "noise_step": 1000}

    def __post_init__(self):
        self.check_weights()
        if not (isinstance(self.noise_step, int) and not isinstance(self.noise_step, bool)
                and 0 <= self.noise_step < DIFFUSION_STEPS):  # fmt: skip
            self.fail("noise_step", f"must be an integer in [0, {DIFFUSION_STEPS - 1}]")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            self.fail("seed", "must be an integer >= 0")

    def contrast_embeds(self, family, input_ids, model_kwargs, embeds):
        pixel_values = model_kwargs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("vcd distorts the image: generate needs pixel_values")
        if pixel_values.dim() < 4:  # Qwen-VL: every image's patches flattened, (patches, C x T x P x P)
            raise ValueError(
                f"vcd adds one noise image to images given as (..., C, H, W) pixel values; this model's are "
                f"{tuple(pixel_values.shape)} (flattened patches, e.g. Qwen-VL's), which it cannot noise pixel by pixel"
            )
        noisy = {key: value for key, value in model_kwargs.items() if key != "mm_encoder_outputs"}
        noisy["pixel_values"] = diffusion_noise(pixel_values, self.noise_step, self.seed)
        return family.embed_prompt(input_ids, noisy)
