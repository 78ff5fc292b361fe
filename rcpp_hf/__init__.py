"""rcpp_hf: RCPP + DRCD decoding for LLaVA-style models, native to HuggingFace transformers."""

__version__ = "0.1.0"
