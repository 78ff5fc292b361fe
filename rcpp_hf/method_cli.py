"""Picking a registry method on the command line: `--method NAME [--method-config YAML]`, shared by `generate`,
`eval` and `bench`.

A `--method-config` YAML is either a method preset (a mapping with a "method" key, e.g. `configs/fastv_128.yaml`,
what `MethodConfig.to_yaml` writes) or the settings of the method `--method` names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rcpp_hf.methods import METHODS, MethodConfig, load_method
from rcpp_hf.presets import read_yaml_mapping


def add_method_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--method", help=f"a registered method, run with its defaults or --method-config "
                        f"(known: {', '.join(METHODS)})")
    parser.add_argument("--method-config", help="YAML: a method preset with a 'method' key (e.g. "
                        "configs/fastv_128.yaml), or settings for --method")


def read_method_yaml(path: str | Path, name: str | None = None) -> dict:
    """The method dict {"method": name, **settings} of a `--method-config` file; `name` is `--method` (None: the
    file must name its method). Only reads YAML, so a bad file fails before any model work."""
    values = read_yaml_mapping(path, "method config", "of method settings")
    preset = values.get("method")
    if preset is None and name is None:
        raise ValueError(f"{path} has no 'method' key: name the method with --method")
    if preset is not None and name is not None and preset != name:
        raise ValueError(f"--method {name} conflicts with {path}, a preset of method {preset!r}")
    return {"method": preset or name, **{key: value for key, value in values.items() if key != "method"}}


def method_from_args(name: str | None, config_path: str | Path | None) -> MethodConfig | None:
    """The method `--method` / `--method-config` ask for (validated), or None when neither is given."""
    if config_path is not None:
        return load_method(read_method_yaml(config_path, name))
    return None if name is None else load_method(name)


def with_method(generation_config, method: MethodConfig | None):
    """`generation_config` (an `RCPPGenerationConfig`) with `method` added to its methods, validated (two methods
    of one kind are refused)."""
    if method is not None:
        generation_config.methods = (*generation_config.methods, method)
        generation_config.validate()
    return generation_config
