"""The inference-time methods, side by side, one file each, registered by name (see `registry.py`); the kinds they
belong to and what each does in `generate` are in `protocol.py`."""

from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.methods.registry import (  # isort: skip
    METHODS,
    check_compatible,
    load_method,
    method_class,
    method_config,
    method_from_dict,
    register_method,
)

# Each method registers itself on import, in this order (the order `METHODS` lists them in).
from rcpp_hf.methods.cdpruner import CDPruner  # noqa: E402
from rcpp_hf.methods.dart import DART  # noqa: E402
from rcpp_hf.methods.divprune import DivPrune  # noqa: E402
from rcpp_hf.methods.downsample import Downsample  # noqa: E402
from rcpp_hf.methods.fastv import FastV  # noqa: E402
from rcpp_hf.methods.fastv_finepruner import FastVFinePruner  # noqa: E402
from rcpp_hf.methods.gan_pruner.method import GanPruner  # noqa: E402
from rcpp_hf.methods.himap import HiMAP  # noqa: E402
from rcpp_hf.methods.mc_lcbf import MCLCBF  # noqa: E402
from rcpp_hf.methods.pdrop import PDrop  # noqa: E402
from rcpp_hf.methods.plausibility import PlausibilityCutoff  # noqa: E402
from rcpp_hf.methods.random_pruning import RandomPruning  # noqa: E402
from rcpp_hf.methods.rcpp import RCPP  # noqa: E402
from rcpp_hf.methods.sid import SID  # noqa: E402
from rcpp_hf.methods.sparsevlm import SparseVLM  # noqa: E402
from rcpp_hf.methods.vcd import VCD  # noqa: E402
from rcpp_hf.methods.visionzip import VisionZip  # noqa: E402
from rcpp_hf.methods.vispruner import VisPruner  # noqa: E402

__all__ = [
    "METHODS",
    "CDPruner",
    "DART",
    "DivPrune",
    "Downsample",
    "FastV",
    "FastVFinePruner",
    "GanPruner",
    "HiMAP",
    "MCLCBF",
    "PDrop",
    "PlausibilityCutoff",
    "RCPP",
    "RandomPruning",
    "SID",
    "SparseVLM",
    "VCD",
    "VisPruner",
    "VisionZip",
    "MethodConfig",
    "check_compatible",
    "load_method",
    "method_class",
    "method_config",
    "method_from_dict",
    "register_method",
]
