"""`MethodConfig`: the settings of one inference-time method, a small validated dataclass saved as YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import yaml


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's settings. A subclass is a dataclass with a registry `name` that validates its fields in
    `__post_init__` (ValueError naming the field) and adds the hooks of its kind (e.g. `PrefillPruner`)."""

    name: ClassVar[str] = ""
    # Other names a method's settings are known by (e.g. its repository's config keys): alias -> field, or None for
    # a setting accepted and ignored. `registry.method_config` renames them before validation.
    SETTING_ALIASES: ClassVar[dict[str, str | None]] = {}

    # -- the method contract (tests/test_method_contract.py) --------------------------------------------------------
    # Every registered method is checked on the test suite's tiny LLaVA (4 decoder layers, 16 visual tokens, 4 query
    # heads sharing 2 kv heads, hidden size 64): its settings round trip, neutral settings decode as vanilla, a
    # left-padded batch decodes as its rows alone, a prefill pruner's physical drop equals masking, bad settings
    # raise naming the field. Each method declares, in its own class body (a subclass's settings differ from its
    # parent's, so declarations are not inherited), the settings those checks use; one it lacks fails its contract
    # with a message naming it. Settings are {field: value} dicts, on top of the defaults.
    #   CONTRACT_NEUTRAL (required): settings with which `generate` is token-identical to vanilla (e.g. keep every
    #     token), or None when the method has none; then CONTRACT_NOT_NEUTRAL (required) says why.
    #   CONTRACT_INVALID (required, not empty): {field: a value} that must raise ValueError naming the field.
    #   CONTRACT_MASKABLE (required of prefill pruners): True when dropping the tokens it drops equals masking them
    #     from the same layers on, or why not (a str: e.g. kept entries that get new hidden states).
    #   CONTRACT_ACTING (optional, default {}): settings with which the method acts on the tiny model, where the
    #     defaults do not fit it (layer counts, budgets above its 16 visual tokens); every row keeps as many visual
    #     tokens in a batch as alone.
    #   `contract_files` (optional): settings that name files the method needs (e.g. trained weights), written for
    #     the tiny model; they underlie every other contract setting.
    CONTRACT_NEUTRAL: ClassVar[dict | None]
    CONTRACT_NOT_NEUTRAL: ClassVar[str]
    CONTRACT_INVALID: ClassVar[dict]
    CONTRACT_MASKABLE: ClassVar[bool | str]
    CONTRACT_ACTING: ClassVar[dict] = {}

    @classmethod
    def contract_files(cls, folder: Path, model_config) -> dict:
        """Settings naming files written under `folder` for a model of `model_config` (a LlavaConfig) that the
        method needs to run there; {} when it needs none."""
        return {}

    def fail(self, field: str, why: str):
        raise ValueError(f"{type(self).__name__}.{field} = {getattr(self, field)!r}: {why}")

    def to_dict(self) -> dict:
        """{"method": name, field: value, ...}, plain Python values (tuples as lists)."""
        values = {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }
        return {"method": self.name, **values}

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def describe(self) -> str:
        """`name(field=value, ...)` with the fields that differ from the defaults."""
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default
        ]
        return f"{self.name}({', '.join(changed)})"
