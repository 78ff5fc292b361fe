"""Model families: one adapter per family answers everything model-specific that rcpp_hf's methods need."""

from rcpp_hf.families.base import ModelFamily
from rcpp_hf.families.llava import LlavaFamily
from rcpp_hf.families.llava_next import LlavaNextFamily
from rcpp_hf.families.llava_onevision import LlavaOnevisionFamily

__all__ = ["LlavaFamily", "LlavaNextFamily", "LlavaOnevisionFamily", "ModelFamily"]
