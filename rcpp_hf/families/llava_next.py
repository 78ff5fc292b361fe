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

from transformers import LlavaNextForConditionalGeneration

from rcpp_hf.families.llava import LlavaFamily


class LlavaNextFamily(LlavaFamily):
    stock_class = LlavaNextForConditionalGeneration

    def encode_images_recorded(self, input_ids, model_kwargs, pruner):
        raise ValueError(
            f"{pruner.name} reads the vision tower, which rcpp_hf records for one tile per image (LLaVA-1.5); "
            f"{self.model.config.model_type}'s anyres images are several tiles plus newline tokens, not supported "
            "yet: use a language-side pruner (fastv, pdrop, sparsevlm, dart, divprune, random, ...) on this model"
        )
