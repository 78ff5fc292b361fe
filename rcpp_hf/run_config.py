"""A run's generation config, built in one place for `generate`, `eval`, `bench` and the ShapesWorld runs: an RCPP
YAML preset (or plain greedy decoding), the caller's overrides, registry methods added.

A method comes from a registered name or from a `--method-config` YAML file: either a method preset (a mapping with
a "method" key, e.g. the shipped `fastv_128of576`, what `MethodConfig.to_yaml` writes) or the settings of the method
named beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rcpp_hf.config import RCPPGenerationConfig
from rcpp_hf.methods import MethodConfig, load_method
from rcpp_hf.presets import METHODS as METHOD_PRESETS
from rcpp_hf.presets import find_preset, read_yaml_mapping


def read_method_yaml(path: str | Path, name: str | None = None) -> dict:
    """The method dict {"method": name, **settings} of a `--method-config` file; `name` is `--method` (None: the
    file must name its method). Only reads YAML, so a bad file fails before any model work."""
    values = read_yaml_mapping(find_preset(path, METHOD_PRESETS), "method preset", "of method settings")
    preset = values.get("method")
    if preset is None and name is None:
        raise ValueError(f"{path} has no 'method' key: name the method with --method")
    if preset is not None and name is not None and preset != name:
        raise ValueError(f"--method {name} conflicts with {path}, a preset of method {preset!r}")
    return {"method": preset or name, **{key: value for key, value in values.items() if key != "method"}}


def load_method_preset(name: str | None, config_path: str | Path | None) -> MethodConfig | None:
    """The method that a name and / or a method YAML file ask for (validated), or None when neither is given."""
    if config_path is not None:
        return load_method(read_method_yaml(config_path, name))
    return None if name is None else load_method(name)


def build_generation_config(
    preset: str | Path | None = None,
    methods: MethodConfig | Sequence[MethodConfig] | None = None,
    **overrides,
) -> RCPPGenerationConfig:
    """The decoding configuration of a run, validated.

    Args:
        preset: a generation preset, by name or path (`RCPPGenerationConfig.from_yaml`); None: plain greedy LLaVA
            decoding (`rcpp=False, do_sample=False`).
        methods: registry methods added after the preset's own (two of one kind are refused).
        overrides: fields set over the preset's, e.g. `max_new_tokens=64` or, without a preset, `rcpp=True`.

    Reads only YAML, so a bad configuration fails before any weights are loaded.
    """
    values = {"rcpp": False, "do_sample": False} if preset is None else RCPPGenerationConfig.preset_values(preset)
    values = {**values, **overrides}
    added = (methods,) if isinstance(methods, MethodConfig) else tuple(methods or ())
    values["methods"] = [*values.get("methods", ()), *added]
    return RCPPGenerationConfig(**values)  # the constructor: an added `rcpp` method sets RCPP's fields
