"""`MethodConfig`: the settings of one inference-time method, a small validated dataclass saved as YAML, and the
entry point of its work in `generate` (`start`, see `protocol.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import yaml


@dataclasses.dataclass
class MethodConfig:
    """Base of every method's settings. A subclass is a dataclass with a registry `name` that validates its fields in
    `__post_init__` (ValueError naming the field); it derives from the base of its kind (`PrefillPruner`,
    `SteeringMethod`, `ContrastiveDecoder`, or `DecodingMethod`), which implements `start`.

    Attributes:
        kind: one of `protocol.KINDS`; one generate call runs at most one method of each kind.
        reads_vision: `generate` records the vision tower while it encodes the images, for this method.
        distorts_image: the method reads the pixel values itself (e.g. VCD's noised image).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    reads_vision: ClassVar[bool] = False
    distorts_image: ClassVar[bool] = False
    # Other names a method's settings are known by (e.g. its repository's config keys): alias -> field, or None for
    # a setting accepted and ignored. `registry.method_config` renames them before validation.
    SETTING_ALIASES: ClassVar[dict[str, str | None]] = {}

    def start(self, ctx):
        """This method's `protocol.MethodState` for one `generate` call (`ctx`: its `protocol.GenerateContext`)."""
        raise NotImplementedError

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
