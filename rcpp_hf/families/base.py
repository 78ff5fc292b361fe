"""`ModelFamily`: the seam between rcpp_hf's methods and one family of vision-language models.

Methods and the engine never reach into a model's modules by attribute path: what differs between families (where
the decoder and its rotary embedding are, where image tokens sit in each row, the positions of the prompt's
entries and of the next token, how images are encoded and how the vision tower's attention is recorded, which stock
transformers class the model is) is answered here, one adapter per family (`llava.py`, `llava_next.py`,
`llava_onevision.py`; docs/families.md). A method written against this interface runs on every family that
implements it.

Shapes: B = batch rows, S = prompt length, D = the decoder's hidden size, V = visual tokens of a row's image.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import PreTrainedModel

from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.vision import VisionRecord


class ModelFamily:
    """The model-specific answers for one loaded model (`model.family`). Subclasses implement every method.

    Attributes:
        stock_class: the transformers class this family's rcpp_hf class extends; with no method on, the two are
            the same model (same logits, attention maps and `generate`).
    """

    stock_class: ClassVar[type[PreTrainedModel]]

    def __init__(self, model: PreTrainedModel):
        self.model = model

    @staticmethod
    def config_shape(config) -> tuple[int, int]:
        """(decoder layers, visual tokens of an image) from the model's config alone, for checks made before the
        model loads (e.g. a budget the model cannot reach); for anyres families, the most an image can have."""
        raise NotImplementedError

    # -- the decoder ---------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder `engine.decoder.run_decoder` runs: `embed_tokens`, `layers`, `rotary_emb`, `norm`, `config`
        (transformers' Llama-family decoder modules)."""
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (B, q, D) -> next-token logits (B, q, vocab), float32."""
        raise NotImplementedError

    # -- the prompt ----------------------------------------------------------------------------------------------
    def image_token_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, S) bool: which prompt entries are image tokens (the visual tokens the methods act on)."""
        raise NotImplementedError

    def visual_token_counts(self, input_ids: torch.LongTensor) -> tuple[int, ...]:
        """V of each row (rows differ when their images do, e.g. anyres images of different sizes); raises when a
        row has none."""
        raise NotImplementedError

    def prompt_layout(self, input_ids: torch.LongTensor, model_kwargs: dict) -> TokenLayout:
        """The prompt's entries: logical positions (what RoPE uses), padding and visual ids, all (B, S)."""
        raise NotImplementedError

    def next_positions(self, position_ids: torch.LongTensor) -> torch.LongTensor:
        """The position (B, 1) of the token after the entries at `position_ids` (B, q)."""
        raise NotImplementedError

    # -- images --------------------------------------------------------------------------------------------------
    def embed_prompt(self, input_ids: torch.LongTensor, model_kwargs: dict, encoded=None) -> torch.Tensor:
        """The decoder's input (B, S, D): token embeddings with the image features in place of the image tokens.
        `encoded`: the images already encoded (`encode_images_recorded`), else they are encoded here."""
        raise NotImplementedError

    def encode_images_recorded(self, input_ids: torch.LongTensor, model_kwargs: dict, pruner) -> tuple[object, VisionRecord]:
        """Encode the images while recording the vision layer `pruner` (a `VisionPruner`) reads -> (the encoded
        images for `embed_prompt`, the `VisionRecord`)."""
        raise NotImplementedError
