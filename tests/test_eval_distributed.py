"""`accelerate launch` with two CPU processes (gloo) answers exactly what one process answers."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from rcpp_hf.eval.pope import evaluate_pope
from rcpp_hf.presets import GENERATION, shipped
from tests.eval_helpers import options, read_jsonl, without_timing

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_answer_what_one_process_answers(varied_tiny_path, pope_files, tmp_path):
    files, images = pope_files
    # RCPP + DRCD with eviction, sampled: equal answers also need per-batch seeds independent of sharding.
    preset = yaml.safe_load((shipped(GENERATION) / "rcpp_evict.yaml").read_text())
    sampling = tmp_path / "rcpp_evict_sampled.yaml"
    sampling.write_text(yaml.safe_dump({**preset, "do_sample": True, "temperature": 1.0}))
    single = evaluate_pope(files, images, options(varied_tiny_path, tmp_path / "one", batch_size=3, config=sampling))

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    command = ["-m", "rcpp_hf.cli", "eval", "pope", "--question-file", *map(str, files), "--image-folder", str(images),
               "--output-dir", str(tmp_path / "two"), "--model", str(varied_tiny_path), "--batch-size", "3",
               "--max-new-tokens", "4", "--device", "cpu", "--config", str(sampling)]
    result = subprocess.run(launch + command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    two = tmp_path / "two"
    parts = [read_jsonl(two / f"answers.part-{k}.jsonl") for k in (0, 1)]
    assert [len(part) for part in parts] == [12, 12]  # 8 batches of 3, alternately to each process
    assert without_timing(read_jsonl(two / "answers.jsonl")) == without_timing(read_jsonl(tmp_path / "one" / "answers.jsonl"))
    metrics = json.loads((two / "metrics.json").read_text())
    assert {k: v for k, v in metrics.items() if k != "latency"} == {k: v for k, v in single.items() if k != "latency"}
    assert json.loads((two / "config.json").read_text())["sessions"][0]["num_processes"] == 2
