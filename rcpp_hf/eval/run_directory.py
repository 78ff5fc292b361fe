"""A run directory: what was run (config.json), its answers (JSON lines) and its metrics (metrics.json); the one
way every evaluation (`eval.harness`, `shapesworld.evaluate`) keeps a resumable run folder.

    <output-dir>/
        config.json           benchmark, inputs, model, decoding config, prompt, seed (the run's identity)
                              and one entry per session (command, versions, processes, batch size)
        answers.part-<k>.jsonl  answers as process k produced them, appended one batch at a time
        answers.jsonl         all answers in benchmark order, rewritten when a session completes
        metrics.json          the benchmark's metrics over answers.jsonl

A rerun with the same identity resumes: what any part file holds is not asked again. A rerun with a
different identity is refused, so answers from two configurations never mix. How many items a session asks
(`--limit`) is not identity: a session's limit is recorded with its provenance.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import rcpp_hf
from rcpp_hf.eval.results import ResultsFile


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.answers_path = self.path / "answers.jsonl"
        self.metrics_path = self.path / "metrics.json"

    def part(self, process_index: int) -> ResultsFile:
        return ResultsFile(self.path / f"answers.part-{process_index}.jsonl")

    def parts(self) -> list[ResultsFile]:
        return [ResultsFile(path) for path in sorted(self.path.glob("answers.part-*.jsonl"))]

    def done_ids(self) -> set:
        return set().union(*(part.done_ids() for part in self.parts()))

    def answers_in_order(self, ids: list[str]) -> list[dict]:
        """The part files' answers to `ids`, in that order (the first answer of an id when a part holds two)."""
        by_id = {}
        for part in self.parts():
            for record in part.read():
                by_id.setdefault(record["id"], record)
        missing = [item_id for item_id in ids if item_id not in by_id]
        if missing:
            raise RuntimeError(f"{self.path}: {len(missing)} items have no answer after the run, e.g. {missing[:3]}")
        return [by_id[item_id] for item_id in ids]

    def check_identity(self, identity: dict) -> None:
        """Refuse to resume a run whose recorded identity differs from `identity`."""
        if not self.config_path.exists():
            return
        recorded = json.loads(self.config_path.read_text())["identity"]
        current = json.loads(json.dumps(identity))  # the same JSON round trip as the recorded one
        if recorded != current:
            keys = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
            raise ValueError(
                f"{self.config_path}: this run directory holds a run with a different {', '.join(keys)}; "
                f"to run with other {', '.join(keys)}, choose another --output-dir, or delete it to start over"
            )

    def record_session(self, identity: dict, session: dict) -> None:
        """Write config.json: the identity and, appended to the earlier ones, this session's provenance."""
        sessions = json.loads(self.config_path.read_text())["sessions"] if self.config_path.exists() else []
        _write_json(self.config_path, {"identity": identity, "sessions": sessions + [session]})

    def write_answers(self, records: list[dict]) -> None:
        _write_json_lines(self.answers_path, records)

    def read_answers(self) -> list[dict]:
        return ResultsFile(self.answers_path).read()

    def write_metrics(self, metrics: dict) -> None:
        _write_json(self.metrics_path, metrics)

    def read_config(self) -> dict:
        return json.loads(self.config_path.read_text())

    def read_metrics(self) -> dict:
        return json.loads(self.metrics_path.read_text())


def session_provenance(**extra) -> dict:
    """When, how and with which software a session ran."""
    import accelerate
    import torch
    import transformers

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "versions": {
            "rcpp_hf": rcpp_hf.__version__,
            "rcpp_hf_git": _git_commit(Path(rcpp_hf.__file__).parent),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
        },
        **extra,
    }


def _git_commit(folder: Path) -> str | None:
    """The checkout's commit (with "-dirty" when it has changes), or None outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, data: dict) -> None:
    _replace(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_json_lines(path: Path, records: list[dict]) -> None:
    _replace(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _replace(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
