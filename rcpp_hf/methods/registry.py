"""Every inference-time method, registered by name: `method_config("fastv", budget=128)`, `load_method(path)`.

The registry maps names to config classes and is filled once, when `rcpp_hf.methods` is imported; nothing in it
changes at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from rcpp_hf.methods.base import MethodConfig
from rcpp_hf.presets import GENERATION, is_preset_path, preset_names, read_preset
from rcpp_hf.presets import METHODS as METHOD_PRESETS

METHODS: dict[str, type[MethodConfig]] = {}


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make `cls` known by `cls.name`."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_aliases(cls: type[MethodConfig], settings: dict) -> dict:
    """`settings` with `cls.SETTING_ALIASES` renamed to their fields (ignored ones dropped); an alias given beside
    its field raises."""
    resolved = {key: value for key, value in settings.items() if key not in cls.SETTING_ALIASES}
    for alias, field in cls.SETTING_ALIASES.items():
        if alias in settings and field is not None:
            if field in resolved:
                raise ValueError(f"method {cls.name!r}: {alias!r} is another name of {field!r}; give one of them")
            resolved[field] = settings[alias]
    return resolved


def method_config(name: str, **settings) -> MethodConfig:
    """The config of method `name` with `settings` (validated; an unknown setting raises naming it)."""
    cls = method_class(name)
    settings = resolve_aliases(cls, settings)
    known = {field.name for field in dataclasses.fields(cls)}  # not __dataclass_fields__: it lists the ClassVars too
    unknown = sorted(set(settings) - known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"method {name!r} has no setting(s) {unknown}{hint}; its settings: {sorted(known)}")
    return cls(**settings)


def method_from_dict(values: dict) -> MethodConfig:
    """Inverse of `MethodConfig.to_dict`: {"method": name, **settings}."""
    values = dict(values)
    if "method" not in values:
        raise ValueError(f"a method config needs a 'method' key naming the method; got keys {sorted(values)}")
    return method_config(values.pop("method"), **values)


def load_method(spec: str | Path | dict | MethodConfig, **overrides) -> MethodConfig:
    """A method from a config object, a dict, a registered name (its defaults), or a method preset: a shipped
    preset's name (`fastv_128of576`, see `rcpp_hf.presets`) or a path to a YAML file."""
    if isinstance(spec, MethodConfig):
        return method_from_dict({**spec.to_dict(), **overrides}) if overrides else spec
    if isinstance(spec, dict):
        return method_from_dict({**spec, **overrides})
    name = str(spec)
    if not is_preset_path(spec):
        if name in METHODS:
            return method_config(name, **overrides)
        if name not in preset_names(METHOD_PRESETS) + preset_names(GENERATION):
            raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}; shipped method "
                             f"presets: {', '.join(preset_names(METHOD_PRESETS))}")  # fmt: skip
    return method_from_dict({**read_preset(spec, METHOD_PRESETS), **overrides})


def check_compatible(methods: tuple[MethodConfig, ...]) -> None:
    """Methods combine when each acts in a different place: at most one of each kind (e.g. one prefill pruner)."""
    by_kind: dict[str, MethodConfig] = {}
    for method in methods:
        kind = method.kind
        if kind in by_kind:
            raise ValueError(
                f"methods {by_kind[kind].name!r} and {method.name!r} cannot be combined: both are {kind}s, and one "
                f"generate call runs at most one {kind}"
            )
        by_kind[kind] = method
