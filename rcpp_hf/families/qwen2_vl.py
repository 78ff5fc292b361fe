"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, transformers
5.23 models/qwen2_vl and models/qwen2_5_vl): a vision tower at dynamic resolution whose patch merger joins 2 x 2
patches into one visual token, and a Qwen2 decoder with M-RoPE. Each image is one run of `image_token_id` tokens,
`image_grid_thw` patches / 4 long, so images of different sizes give different counts.

Positions are 3-D: `generate` builds position ids of shape (4, B, S), a text row (what the mask reads) plus the
temporal / height / width rows of `get_rope_index` (which reads `mm_token_type_ids`); the text after an image
continues from the image's largest position, so that each row's M-RoPE positions there are its text positions plus
`model.model.rope_deltas` (B, 1), and so are each generated token's, in all three rows. The prompt's `TokenLayout`
carries the three rows and the delta (`mrope`, `mrope_delta`): a kept token keeps its 3-D position, and a
generated token gets its text position plus the delta. The decoder, the image embedding and the refusal of
sliding-window decoders are OneVision's (a Qwen2 decoder, `get_placeholder_mask` returning image and video masks).
The two families differ only in their stock class.
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.families.llava_onevision import LlavaOnevisionFamily


class Qwen2VLFamily(LlavaOnevisionFamily):
    stock_class = Qwen2VLForConditionalGeneration

    @staticmethod
    def config_shape(config) -> tuple[int, int]:
        raise ValueError(
            f"the visual tokens of a {config.model_type} image are set by its image processor's max_pixels, not by "
            "the model's config: count them from the processor's image_grid_thw (patches / 4)"
        )

    def prompt_layout(self, input_ids: torch.LongTensor, model_kwargs: dict) -> TokenLayout:
        """From `generate`'s (4, B, S) position ids and the rope deltas it cached
        (`_prepare_position_ids_for_generation`)."""
        position_ids, delta = model_kwargs["position_ids"], self.model.model.rope_deltas
        if position_ids.dim() != 3 or position_ids.shape[0] != 4 or delta is None:
            raise ValueError(
                f"rcpp_hf's methods on {self.model.config.model_type} take generate's M-RoPE position ids (4, B, S) "
                f"and rope_deltas; got position ids {tuple(position_ids.shape)}: call generate without position_ids"
            )
        valid = model_kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        return TokenLayout.prompt(position_ids[0], valid, self.image_token_mask(input_ids), mrope=position_ids[1:],
                                  mrope_delta=delta.to(position_ids.device))  # fmt: skip

    def next_positions(self, position_ids: torch.LongTensor) -> torch.LongTensor:
        """The text position (B, 1) of the next token; its M-RoPE position adds the layout's delta
        (`TokenLayout.generated`)."""
        text = position_ids[0] if position_ids.dim() == 3 else position_ids  # the prompt's (4, B, S), then (B, 1)
        return text[:, -1:] + 1

    def encode_images_recorded(self, input_ids, model_kwargs, pruner):
        raise ValueError(
            f"{pruner.name} reads the vision tower, which rcpp_hf records for LLaVA's CLIP tower only; "
            f"{self.model.config.model_type}'s tower (windowed attention, 2 x 2 merger, no CLS, no attention weights) "
            "is not supported yet: use a language-side pruner (fastv, pdrop, sparsevlm, dart, divprune, random, ...)"
        )


class Qwen2_5_VLFamily(Qwen2VLFamily):
    stock_class = Qwen2_5_VLForConditionalGeneration
