"""`rcpp-hf demo` and the walkthrough notebook, on the embedded ShapesWorld model."""

import os
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

from rcpp_hf.cli import main
from rcpp_hf.rcpp.trace import RCPPStep
from rcpp_hf.shapesworld.demo import CORE, EVICTED, NOISE, demo_scene, patch_states

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_patch_states_by_hand():
    step = RCPPStep(step=3, scores=torch.tensor([[0.2, -0.1, float("nan"), 0.0]]), num_core=torch.tensor([2]),
                    num_noise=torch.tensor([1]), evicted=torch.zeros(1, 0, dtype=torch.long), lambda_t=0.1,
                    keep_ratio=0.75, cache_bytes=0, visual_cache_bytes=0)  # fmt: skip
    assert patch_states(step, tau=0.0).tolist() == [CORE, NOISE, EVICTED, CORE]
    # The median of the three cached scores (-0.1, 0.0, 0.2), the evicted one left out.
    assert patch_states(step, tau=0.5, tau_mode="quantile").tolist() == [CORE, NOISE, EVICTED, CORE]
    assert patch_states(step, tau=1.0, tau_mode="quantile").tolist() == [CORE, NOISE, EVICTED, NOISE]


def test_demo_scene_holds_a_kind_without_its_partner():
    assert demo_scene().lone_kinds()


def test_demo_prints_both_captions_and_writes_the_patch_map(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", "--output", str(png), "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    for line in ("true objects:", "original LLaVA:", "RCPP + DRCD:", "visual tokens kept at the last step:"):
        assert line in out
    assert png.stat().st_size > 10_000


def test_walkthrough_notebook_runs_on_the_embedded_model(tmp_path, monkeypatch):
    # The kernel is a new process: point it at this checkout's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "rcpp_walkthrough.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # the scene and the three plots
    text = "".join(o.get("text", "") for o in outputs)
    assert "RCPP + DRCD" in text and "true objects:" in text
