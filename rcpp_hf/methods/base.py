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
        ragged_rows: the method runs batches whose rows hold different numbers of visual tokens (anyres images of
            different sizes); the others refuse them.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    reads_vision: ClassVar[bool] = False
    distorts_image: ClassVar[bool] = False
    ragged_rows: ClassVar[bool] = False
    # Other names a method's settings are known by (e.g. its repository's config keys): alias -> field, or None for
    # a setting accepted and ignored. `registry.method_config` renames them before validation.
    SETTING_ALIASES: ClassVar[dict[str, str | None]] = {}

    def start(self, ctx):
        """This method's `protocol.MethodState` for one `generate` call (`ctx`: its `protocol.GenerateContext`)."""
        raise NotImplementedError

    # -- the method contract (tests/test_method_contract.py) --------------------------------------------------------
    # Every registered method is checked on the test suite's tiny LLaVA (4 decoder layers, 16 visual tokens, 4 query
    # heads sharing 2 kv heads, hidden size 64), with settings it declares in its own class body: a parent's
    # declarations are not inherited, since a subclass's settings differ; a missing one fails the contract, naming
    # it. Settings are {field: value} over the defaults.
    #   CONTRACT_NEUTRAL (required): settings with which `generate` equals vanilla's (tokens and logits), e.g. keeping
    #     every token; None when the method has none, and then CONTRACT_NOT_NEUTRAL (required) says why.
    #   CONTRACT_ACTING (optional; {} when not declared): settings with which the method changes the logits on the
    #     tiny model and decodes each row of a batch as alone; needed where the defaults do not fit it (layers,
    #     budgets above 16 visual tokens, heads) or do not act.
    #   CONTRACT_INVALID (required, not empty): {field: value}, each of which alone raises ValueError reading
    #     "field = value" (as `fail` writes it).
    #   CONTRACT_MASKABLE (required of prefill pruners): True when, with the acting settings, dropping its tokens
    #     equals masking them from the same layers on; else why not (e.g. kept entries that get new hidden states).
    #   `contract_files` (optional): settings naming files the method needs (e.g. trained weights), written for the
    #     tiny model; every other contract setting is applied over them.
    CONTRACT_NEUTRAL: ClassVar[dict | None]
    CONTRACT_NOT_NEUTRAL: ClassVar[str]
    CONTRACT_ACTING: ClassVar[dict]
    CONTRACT_INVALID: ClassVar[dict]
    CONTRACT_MASKABLE: ClassVar[bool | str]

    @classmethod
    def contract_files(cls, folder: Path, model_config) -> dict:
        """Settings naming files written under `folder` for a model of `model_config` (a LlavaConfig) that the
        method needs to run there; {} when it needs none."""
        return {}

    def check_fits(self, num_layers: int, num_visual: int) -> None:
        """Raise ValueError naming the setting that does not fit a decoder of `num_layers` layers and an image of
        `num_visual` visual tokens (e.g. a budget larger than the image, or unreachable); checked from the model's
        shape alone, before any model work. Methods whose settings fit every model keep this default."""

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
