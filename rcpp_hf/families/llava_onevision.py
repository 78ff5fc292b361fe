"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, transformers 5.23
models/llava_onevision/modeling_llava_onevision.py): a SigLIP tower (no CLS token), the projector and a Qwen2 decoder
(bias in q / k / v, grouped-query attention). Images are laid out as LLaVA-NeXT's (base tile, unpadded grid with a
newline token per row), except that `anyres_max_9` shrinks a large grid bilinearly, so that grid tokens no longer
map one to one to patches; `batch_num_images` travels with the pixel values (`image_feature_kwargs` passes it).
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from rcpp_hf.families.llava_next import LlavaNextFamily, anyres_shape


class LlavaOnevisionFamily(LlavaNextFamily):
    stock_class = LlavaOnevisionForConditionalGeneration

    @staticmethod
    def config_shape(config) -> tuple[int, int]:
        return anyres_shape(config, max_tiles=int(config.vision_aspect_ratio.removeprefix("anyres_max_")))

    @property
    def language_model(self) -> torch.nn.Module:
        decoder = self.model.model.language_model
        if getattr(decoder, "has_sliding_layers", False):
            raise ValueError(
                "rcpp_hf's methods run decoders whose layers all use full attention; this Qwen2 decoder has "
                "sliding-window layers (use_sliding_window=True): load it with use_sliding_window=False"
            )
        return decoder

    def placeholder_mask(self, input_ids, inputs_embeds, features):
        image_mask, _ = self.model.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                              image_features=features)  # fmt: skip
        return image_mask
