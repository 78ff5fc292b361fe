"""`rcpp-hf demo` and the walkthrough notebook, on the embedded ShapesWorld model."""

import os
import re
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from transformers import AutoProcessor

from rcpp_hf import RCPPLlavaForConditionalGeneration
from rcpp_hf.cli import main
from rcpp_hf.default_model import default_model_path
from rcpp_hf.rcpp.trace import RCPPStep, RCPPTrace
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld.demo import (CORE, DEMO_PRESET, EVICTED, NOISE, caption_both_ways, demo_scene, demo_steps,
                                      patch_state_figure, patch_states, settings_line)  # fmt: skip
from rcpp_hf.shapesworld.render import render_scene

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
    for line in ("true objects:", "original LLaVA:", "RCPP + DRCD:", f"settings ({DEMO_PRESET}):"):
        assert line in out
    kept, total = map(int, re.search(r"visual tokens kept at the last step: (\d+)/(\d+)", out).groups())
    assert kept < total  # the demo's settings evict within a caption
    assert png.stat().st_size > 10_000


def test_demo_figure_shows_the_evicted_patches():
    model = RCPPLlavaForConditionalGeneration.from_pretrained(default_model_path()).eval()
    processor = AutoProcessor.from_pretrained(default_model_path())
    config = build_generation_config(DEMO_PRESET, rcpp=True, max_new_tokens=40, return_dict_in_generate=True)
    image = render_scene(demo_scene())
    _, _, trace = caption_both_ways(model, processor, image, config)
    steps = demo_steps(trace)
    figure = patch_state_figure(image, trace, config.tau, steps, config.tau_mode, settings_line(config))
    evicted = [int(re.search(r"evicted (\d+)", axis.get_title()).group(1)) for axis in figure.axes]
    assert evicted[0] == 0 and evicted[-1] > 0 and evicted == sorted(evicted)  # eviction grows over the steps
    assert evicted[-1] == int(trace.steps[steps[-1]].scores[0].isnan().sum())
    assert settings_line(config) in figure.get_suptitle()


def test_demo_steps_spread_from_the_first_decoded_step_to_the_last():
    assert demo_steps(RCPPTrace(num_visual_tokens=4, steps=[None] * 26)) == [1, 9, 17, 25]
    assert demo_steps(RCPPTrace(num_visual_tokens=4, steps=[None] * 2)) == [1]
    assert demo_steps(RCPPTrace(num_visual_tokens=4, steps=[None])) == [0]


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
