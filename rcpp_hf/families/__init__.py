"""Model families: one adapter per family answers everything model-specific that rcpp_hf's methods need."""

from rcpp_hf.families.base import ModelFamily
from rcpp_hf.families.llava import LlavaFamily
from rcpp_hf.families.llava_next import LlavaNextFamily
from rcpp_hf.families.llava_onevision import LlavaOnevisionFamily
from rcpp_hf.families.qwen2_vl import Qwen2_5_VLFamily, Qwen2VLFamily

__all__ = [
    "LlavaFamily",
    "LlavaNextFamily",
    "LlavaOnevisionFamily",
    "ModelFamily",
    "Qwen2VLFamily",
    "Qwen2_5_VLFamily",
]
