"""The YAML presets that ship inside the package, found by name from any folder, and the one reader of preset files.

Two kinds, told apart by folder and by content:
  generation/  RCPPGenerationConfig presets: RCPP + DRCD's fields and generation fields, no `method` key.
               `RCPPGenerationConfig.from_yaml("rcpp_evict")`, `rcpp-hf ... --config rcpp_evict`.
  methods/     method presets: a `method` key naming a registered method, and its settings.
               `load_method("fastv_128of576")`, `rcpp-hf ... --method-config fastv_128of576`.
A preset's name is its file's stem; a path to a .yaml / .yml file works wherever a name does. Each loader refuses a
preset of the other kind, naming the loader that takes it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

GENERATION, METHODS = "generation", "methods"
KIND_NAMES = {GENERATION: "a generation (RCPP) preset", METHODS: "a method preset"}
LOADERS = {
    GENERATION: "RCPPGenerationConfig.from_yaml(name) or --config",
    METHODS: "load_method(name) or --method-config",
}
YAML_SUFFIXES = (".yaml", ".yml")


def read_yaml_mapping(path, what: str, holds: str) -> dict:
    """The mapping in the YAML file `path` (a path or a shipped preset's `Traversable`; an empty file is {}). Raises
    FileNotFoundError "`what` file not found" and ValueError "expected a mapping `holds`"."""
    path = Path(path) if isinstance(path, str) else path
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping {holds}, got {type(values).__name__}")
    return values


def shipped(kind: str):
    """The folder of the shipped presets of `kind` (a `Traversable`: a folder inside the installed package)."""
    return resources.files(__name__) / kind


def preset_names(kind: str) -> list[str]:
    """The names of the shipped presets of `kind`, sorted."""
    return sorted(entry.name.rsplit(".", 1)[0] for entry in shipped(kind).iterdir() if entry.name.endswith(".yaml"))


def is_preset_path(spec) -> bool:
    """Whether `spec` names a file rather than a shipped preset: a .yaml / .yml path."""
    return Path(str(spec)).suffix in YAML_SUFFIXES


def preset_kind(spec) -> str:
    """The kind of a shipped preset's name (a path: the kind its content says, a `method` key marking a method
    preset); an unknown name raises, listing the shipped presets."""
    if is_preset_path(spec):
        values = read_yaml_mapping(find_preset(spec, GENERATION), "preset", "of settings")
        return METHODS if "method" in values else GENERATION
    for kind in (GENERATION, METHODS):
        if str(spec) in preset_names(kind):
            return kind
    raise ValueError(f"no shipped preset named {str(spec)!r}; generation presets: "
                     f"{', '.join(preset_names(GENERATION))}; method presets: {', '.join(preset_names(METHODS))} (or "
                     "give a path to a .yaml file)")  # fmt: skip


def find_preset(spec, kind: str):
    """The file of `spec`: a path to a YAML file, or the name of a shipped preset of `kind`. A shipped preset of the
    other kind is refused naming its loader; an unknown name lists the shipped ones."""
    if is_preset_path(spec):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{KIND_NAMES[kind].split(' ', 1)[1]} file not found: {path}")
        return path
    name = str(spec)
    if name in preset_names(kind):
        return shipped(kind) / f"{name}.yaml"
    other = METHODS if kind == GENERATION else GENERATION
    if name in preset_names(other):
        raise ValueError(f"{name!r} is {KIND_NAMES[other]}, not {KIND_NAMES[kind]}: load it with {LOADERS[other]}")
    raise ValueError(f"no {KIND_NAMES[kind].split(' ', 1)[1]} named {name!r}; shipped: "
                     f"{', '.join(preset_names(kind))} (or give a path to a .yaml file)")  # fmt: skip


def read_preset(spec, kind: str) -> dict:
    """The mapping of preset `spec` (a name or a path) of `kind`, refused when its content is of the other kind (a
    `method` key marks a method preset)."""
    path = find_preset(spec, kind)
    values = read_yaml_mapping(path, KIND_NAMES[kind], "of settings")
    if kind == GENERATION and "method" in values:
        raise ValueError(f"{spec} is a method preset (method: {values['method']}), not a generation preset: load it "
                         f"with {LOADERS[METHODS]}")  # fmt: skip
    if kind == METHODS and "method" not in values:
        raise ValueError(f"{spec} has no 'method' key: a method preset names its method; a generation (RCPP) preset "
                         f"loads with {LOADERS[GENERATION]}")  # fmt: skip
    return values
