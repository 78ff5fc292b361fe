"""`rcpp_hf.from_pretrained`: a checkpoint loaded as the rcpp_hf class of its model family.

The family is read from the checkpoint's config (`model_type`), as transformers' Auto classes do; each rcpp_hf class
is its stock transformers class plus rcpp_hf's decoding loop (`modeling.MethodsGenerationMixin`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from rcpp_hf.modeling import (
    RCPPLlavaForConditionalGeneration,
    RCPPLlavaNextForConditionalGeneration,
    RCPPLlavaOnevisionForConditionalGeneration,
    RCPPQwen2_5_VLForConditionalGeneration,
    RCPPQwen2VLForConditionalGeneration,
)

# model_type -> rcpp_hf class; one entry per supported family.
RCPP_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": RCPPLlavaForConditionalGeneration,
    "llava_next": RCPPLlavaNextForConditionalGeneration,
    "llava_onevision": RCPPLlavaOnevisionForConditionalGeneration,
    "qwen2_vl": RCPPQwen2VLForConditionalGeneration,
    "qwen2_5_vl": RCPPQwen2_5_VLForConditionalGeneration,
}

# from_pretrained's arguments that locate the config too (the rest are the model's).
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")


def rcpp_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The rcpp_hf class for a model config; refuses a model type no family adapter covers, naming those that do."""
    model_type = getattr(config, "model_type", None)
    if model_type not in RCPP_CLASSES:
        raise ValueError(
            f"rcpp_hf has no model family for model_type {model_type!r}; supported: {sorted(RCPP_CLASSES)}. "
            "Load a checkpoint of one of those families"
        )
    return RCPP_CLASSES[model_type]


def model_shape(path_or_config: str | Path | PretrainedConfig) -> tuple[int, int]:
    """(decoder layers, visual tokens of an image: the most an anyres image gets) of a checkpoint, from its config
    alone (its family's `config_shape`)."""
    config = path_or_config
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(path_or_config)
    return rcpp_class_for(config).family_class.config_shape(config)


def from_pretrained(path_or_id: str | Path, **kwargs) -> PreTrainedModel:
    """Load `path_or_id` (a folder or a hub id) as its family's rcpp_hf class; `kwargs` go to that class's
    `from_pretrained` (dtype, attn_implementation, device_map, ...)."""
    config = kwargs.get("config")
    if not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(path_or_id, **{k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs})
    return rcpp_class_for(config).from_pretrained(path_or_id, **kwargs)
