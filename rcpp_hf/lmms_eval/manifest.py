"""The model lmms-eval finds by the name `rcpp_hf` (the `lmms_eval.models` entry point in setup.cfg points here).

The manifest names the class by its import path: lmms-eval imports `rcpp_hf.lmms_eval.model` only when `rcpp_hf` is
the model asked for.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="rcpp_hf", simple_class_path="rcpp_hf.lmms_eval.model.RCPPLmms")
