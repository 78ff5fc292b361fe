"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, transformers
5.23 models/qwen2_vl and models/qwen2_5_vl): a vision tower at dynamic resolution whose patch merger joins 2 x 2
patches into one visual token, and a Qwen2 decoder with M-RoPE. Each image is one run of `image_token_id` tokens,
`image_grid_thw` patches / 4 long, so images of different sizes give different counts.

Positions are 3-D: `generate` builds position ids of shape (4, B, S), a text row plus the temporal / height / width
rows of `get_rope_index` (which reads `mm_token_type_ids`), and each decoding step adds 1 to every row on top of
the cached `model.model.rope_deltas`. rcpp_hf's decoder runs 1-D positions, so the methods refuse these models until
pruned and evicted tokens keep their 3-D positions (`docs/families.md`); with no method on, the classes are the
stock ones. The two families differ only in their stock class (and Qwen2.5-VL's windowed vision attention, which no
method reads yet).
"""

from __future__ import annotations

from typing import NoReturn

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from rcpp_hf.families.llava import LlavaFamily


class Qwen2VLFamily(LlavaFamily):
    """The decoder (`model.model.language_model`), `lm_head` and the image-token run are LLaVA's; everything that
    needs positions or the vision tower refuses (`refuse`)."""

    stock_class = Qwen2VLForConditionalGeneration

    @staticmethod
    def config_shape(config) -> tuple[int, int]:
        raise ValueError(
            f"the visual tokens of a {config.model_type} image are set by its image processor's max_pixels, not by "
            "the model's config: count them from the processor's image_grid_thw (patches / 4)"
        )

    def refuse(self) -> NoReturn:
        raise ValueError(
            f"rcpp_hf's methods do not run on {self.model.config.model_type} yet: its M-RoPE positions (3-D, from "
            "get_rope_index) for pruned and evicted tokens are not implemented; use a plain GenerationConfig (or "
            "rcpp=False and no method) on this model"
        )

    def prompt_layout(self, input_ids, model_kwargs):
        self.refuse()

    def next_positions(self, position_ids):
        self.refuse()

    def embed_prompt(self, input_ids, model_kwargs, encoded=None):
        self.refuse()

    def encode_images_recorded(self, input_ids, model_kwargs, pruner):
        self.refuse()


class Qwen2_5_VLFamily(Qwen2VLFamily):
    stock_class = Qwen2_5_VLForConditionalGeneration
