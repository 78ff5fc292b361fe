"""Kept only while `rcpp_hf/config.py` and `rcpp_hf/methods/registry.py` import `read_yaml_mapping` from here; its
home is `rcpp_hf.yaml_mapping`."""

from rcpp_hf.yaml_mapping import read_yaml_mapping

__all__ = ["read_yaml_mapping"]
