"""Model families: one adapter per family answers everything model-specific that rcpp_hf's methods need."""

from rcpp_hf.families.base import ModelFamily
from rcpp_hf.families.llava import LlavaFamily

__all__ = ["LlavaFamily", "ModelFamily"]
