"""The inference-time methods, side by side, one file each, registered by name (see `registry.py`)."""

from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.methods.registry import (
    METHODS,
    check_compatible,
    load_method,
    method_class,
    method_config,
    method_from_dict,
    register_method,
)
from rcpp_hf.methods.fastv import FastV  # noqa: E402  (registers itself)

__all__ = [
    "METHODS",
    "FastV",
    "MethodConfig",
    "check_compatible",
    "load_method",
    "method_class",
    "method_config",
    "method_from_dict",
    "register_method",
]
