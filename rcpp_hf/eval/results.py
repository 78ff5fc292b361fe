"""A resumable results file: one JSON object per line, appended and fsync'ed as soon as it exists.

Every record carries an "id" unique within the file. A crash can only leave the last line half
written (each record is written with one `write` call ending in a newline): reading skips such an
unterminated line, and the next append cuts it off before writing, so a rerun redoes that one item
and nothing else. Any other malformed line is an error naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class ResultsFile:
    """JSON-lines records keyed by "id", at `path` (created with its folder on first append)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        """Append `records` and fsync once, so that they are on disk when this returns."""
        lines = []
        for record in records:
            if "id" not in record:
                raise ValueError(f"{self.path}: a results record needs an 'id' field, got keys {sorted(record)}")
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if not lines:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_unterminated_tail()
        with open(self.path, "a", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict]:
        """All complete records in file order; [] when the file does not exist."""
        if not self.path.exists():
            return []
        records = []
        with open(self.path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    break  # the half-written last line of an interrupted run
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{self.path}, line {line_number}: not a JSON record ({error})") from None
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError(f"{self.path}, line {line_number}: a results record must be an object with an 'id'")
                records.append(record)
        return records

    def done_ids(self) -> set:
        return {record["id"] for record in self.read()}

    def _cut_unterminated_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
