"""rcpp_hf: RCPP + DRCD decoding for LLaVA-style models, native to HuggingFace transformers."""

from rcpp_hf.engine.cache import VisualKVCache
from rcpp_hf.auto import from_pretrained
from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.modeling import (
    RCPPLlavaForConditionalGeneration,
    RCPPLlavaNextForConditionalGeneration,
    RCPPLlavaOnevisionForConditionalGeneration,
    RCPPQwen2_5_VLForConditionalGeneration,
    RCPPQwen2VLForConditionalGeneration,
)
from rcpp_hf.rcpp.trace import RCPPGenerateOutput, RCPPStep, RCPPTrace

__version__ = "0.1.0"

__all__ = [
    "RCPPGenerationConfig",
    "RCPPGenerateOutput",
    "RCPPLlavaForConditionalGeneration",
    "RCPPLlavaNextForConditionalGeneration",
    "RCPPLlavaOnevisionForConditionalGeneration",
    "RCPPQwen2_5_VLForConditionalGeneration",
    "RCPPQwen2VLForConditionalGeneration",
    "RCPPStep",
    "RCPPTrace",
    "VisualKVCache",
    "from_pretrained",
]
