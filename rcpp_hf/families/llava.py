"""LLaVA-1.5 (`LlavaForConditionalGeneration`, transformers 5.23 models/llava/modeling_llava.py): a CLIP vision
tower, a projector, and a Llama-family decoder; each image is one run of `image_token_id` tokens in the prompt,
one image per batch row, and positions are the 1-D ones `generate` derives from the attention mask."""

from __future__ import annotations

import inspect

import torch
from transformers import LlavaForConditionalGeneration

from rcpp_hf.engine.layout import TokenLayout
from rcpp_hf.engine.vision import VisionRecord, record_vision_attention, vision_encoder_layers
from rcpp_hf.families.base import ModelFamily


def llava_shape(config) -> tuple[int, int]:
    """(decoder layers, visual tokens per image) of a `LlavaConfig`, from the config alone: the vision tower's
    patches, plus CLS unless the "default" feature selection drops it."""
    vision = config.vision_config
    cls_token = 0 if config.vision_feature_select_strategy == "default" else 1
    return config.text_config.num_hidden_layers, (vision.image_size // vision.patch_size) ** 2 + cls_token


class LlavaFamily(ModelFamily):
    stock_class = LlavaForConditionalGeneration
    config_shape = staticmethod(llava_shape)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    # -- the prompt ----------------------------------------------------------------------------------------------
    def image_token_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return input_ids == self.model.config.image_token_id

    def visual_token_counts(self, input_ids: torch.LongTensor) -> tuple[int, ...]:
        """Also refuses rows with different numbers of images (runs of image tokens): rows may differ in visual
        tokens only through their images' sizes (anyres)."""
        image = self.image_token_mask(input_ids)
        per_row = tuple(image.sum(dim=1).tolist())
        if min(per_row) == 0:
            raise ValueError(
                f"rcpp_hf's methods need image tokens (id {self.model.config.image_token_id}) in every prompt, found "
                f"counts {list(per_row)}; include '<image>' in the text, or use a plain GenerationConfig for "
                "text-only prompts"
            )
        starts = image & ~torch.nn.functional.pad(image[:, :-1], (1, 0), value=False)
        images = starts.sum(dim=1).tolist()
        if len(set(images)) != 1:
            raise ValueError(
                f"rcpp_hf's methods need the same number of images in every batch row, got {images} images "
                f"(image-token counts {list(per_row)}); batch rows with equal numbers of images, or generate them "
                "separately"
            )
        return per_row

    def prompt_layout(self, input_ids: torch.LongTensor, model_kwargs: dict) -> TokenLayout:
        valid = model_kwargs.get("attention_mask")
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
        return TokenLayout.prompt(model_kwargs["position_ids"], valid, self.image_token_mask(input_ids))

    def next_positions(self, position_ids: torch.LongTensor) -> torch.LongTensor:
        return position_ids[:, -1:] + 1

    # -- images --------------------------------------------------------------------------------------------------
    def embed_prompt(self, input_ids: torch.LongTensor, model_kwargs: dict, encoded=None) -> torch.Tensor:
        """The first half of the model's forward (`LlavaModel.forward`): the image features scattered into the token
        embeddings."""
        llava = self.model.model
        inputs_embeds = llava.get_input_embeddings()(input_ids)
        if encoded is None:
            encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")  # generate encodes images up front
        if encoded is None and model_kwargs.get("pixel_values") is not None:
            encoded = llava.get_image_features(**self.image_feature_kwargs(model_kwargs), return_dict=True)
        if encoded is None:
            return inputs_embeds
        features = torch.cat(encoded.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        image_mask = self.placeholder_mask(input_ids, inputs_embeds, features)
        return inputs_embeds.masked_scatter(image_mask, features)

    def image_feature_kwargs(self, model_kwargs: dict) -> dict:
        """The arguments of the model's `get_image_features` found in `model_kwargs`, as `generate` passes them
        (pixel values, and per family image sizes, feature layer and selection, images per row, ...)."""
        parameters = inspect.signature(self.model.model.get_image_features).parameters
        return {name: model_kwargs[name] for name in parameters if name != "kwargs" and name in model_kwargs}

    def placeholder_mask(self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor,
                         features: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(B, S, 1) where the image features go, checked against their count (the model's `get_placeholder_mask`)."""
        return self.model.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)

    def encode_images_recorded(self, input_ids: torch.LongTensor, model_kwargs: dict, pruner):
        pixel_values, batch_size = model_kwargs.get("pixel_values"), input_ids.shape[0]
        if pixel_values is None or pixel_values.shape[0] != batch_size:
            raise ValueError(
                f"{pruner.name} reads the vision tower and takes one image per batch row; got "
                f"{None if pixel_values is None else pixel_values.shape[0]} images for {batch_size} rows"
            )
        config, llava = self.model.config, self.model.model
        feature_layer = model_kwargs.get("vision_feature_layer") or config.vision_feature_layer
        strategy = model_kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(feature_layer, int):
            raise ValueError(f"{pruner.name} needs one vision_feature_layer, got {feature_layer!r}")
        tower = llava.vision_tower
        layers = vision_encoder_layers(tower)
        layer = pruner.resolve_vision_layer(len(layers), feature_layer)
        with record_vision_attention(tower, layer) as recorded:
            encoded = llava.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=feature_layer,
                vision_feature_select_strategy=strategy, return_dict=True,
            )  # fmt: skip
        first_visual = 1 if strategy == "default" else 0  # "default" drops CLS from the features
        attention = layers[layer].self_attn
        return encoded, VisionRecord(
            queries=recorded["queries"],
            keys=recorded["keys"],
            features=encoded.hidden_states[feature_layer][:, first_visual:],
            num_heads=attention.num_heads,
            scale=attention.scale,
            first_visual=first_visual,
            projector=llava.multi_modal_projector,
            post_layernorm=getattr(getattr(tower, "vision_model", tower), "post_layernorm", None),
            input_ids=input_ids,
            name_or_path=config._name_or_path,
        )
