"""Reading a YAML preset file (`configs/*.yaml`) as a mapping: every reader of a preset goes through
`read_yaml_mapping`, so a missing file or a file that is not a mapping fails the same way wherever it is read."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_yaml_mapping(path: str | Path, what: str, holds: str) -> dict:
    """The mapping in the YAML file `path` (an empty file is {}). Raises FileNotFoundError "`what` file not found"
    and ValueError "expected a mapping `holds`" (e.g. what="RCPP config", holds="of config fields")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping {holds}, got {type(values).__name__}")
    return values
