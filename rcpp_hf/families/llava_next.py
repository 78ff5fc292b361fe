"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`, transformers 5.23
models/llava_next/modeling_llava_next.py): LLaVA-1.5's CLIP tower, projector and Llama-family decoder, with anyres images. Each image is one run of
`image_token_id` tokens: its base tile first (CLS dropped), then the unpadded grid of tiles, row by row, with one
`image_newline` token after each row (a learned vector, no vision-tower output). Images of different sizes give
different token counts.

The visual tokens the methods act on are all of the run, newline tokens included: the official LLaVA-NeXT ports of
the language-side pruners (FastV, PyramidDrop, SparseVLM, DART) score and drop the image span as a whole
(`docs/families.md`). Prompt, decoder and image embedding are LLaVA-1.5's (`LlavaFamily`).
"""

from __future__ import annotations

import math

from transformers import LlavaNextForConditionalGeneration

from rcpp_hf.families.llava import LlavaFamily


def anyres_shape(config, max_tiles: int | None = None) -> tuple[int, int]:
    """(decoder layers, the most visual tokens an image gets) of an anyres config: the base tile's tokens plus the
    largest grid of `image_grid_pinpoints` (an image of that grid's aspect ratio is not unpadded) with one newline
    token per row of tokens; `max_tiles` (OneVision's `anyres_max_9`) shrinks a larger grid as the model does.
    llava-hf/llava-v1.6-*: 576 + 48 x 48 + 48 = 2,928."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    cls_token = config.vision_config.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "full"
    tile_tokens = side**2 + cls_token  # SigLIP has no CLS token; CLIP's is dropped by the "default" selection
    most = 0
    for height, width in config.image_grid_pinpoints:
        rows = height // config.vision_config.image_size * side
        cols = width // config.vision_config.image_size * side
        ratio = math.sqrt(rows * cols / (max_tiles * side**2)) if max_tiles else 0.0
        if ratio > 1.1:  # the threshold of LlavaOnevisionModel.pack_image_features
            rows, cols = int(rows // ratio), int(cols // ratio)
        most = max(most, rows * cols + rows)
    return config.text_config.num_hidden_layers, tile_tokens + most


class LlavaNextFamily(LlavaFamily):
    stock_class = LlavaNextForConditionalGeneration
    config_shape = staticmethod(anyres_shape)

    def encode_images_recorded(self, input_ids, model_kwargs, pruner):
        raise ValueError(
            f"{pruner.name} reads the vision tower, which rcpp_hf records for one tile per image (LLaVA-1.5); "
            f"{self.model.config.model_type}'s anyres images are several tiles plus newline tokens, not supported "
            "yet: use a language-side pruner (fastv, pdrop, sparsevlm, dart, divprune, random, ...) on this model"
        )
