"""`rcpp-hf demo` and the notebooks, on the embedded ShapesWorld model."""

import json
import os
import re
import statistics
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from transformers import AutoProcessor

from rcpp_hf import RCPPLlavaForConditionalGeneration
from rcpp_hf.cli import main
from rcpp_hf.default_model import default_model_path
from rcpp_hf.engine.pruning import visual_tokens_per_layer
from rcpp_hf.methods.budget import resolve_budget
from rcpp_hf.methods.sparsevlm import sparsevlm_keep_counts
from rcpp_hf.rcpp.trace import RCPPStep, RCPPTrace
from rcpp_hf.run_config import build_generation_config
from rcpp_hf.shapesworld.demo import (CORE, DEMO_PRESET, EVICTED, NOISE, caption_both_ways, demo_scene, demo_steps,
                                      patch_state_figure, patch_states, settings_line)  # fmt: skip
from rcpp_hf.shapesworld.render import render_scene

REPO_ROOT = Path(__file__).resolve().parents[1]


def execute_notebook(name: str, tmp_path, monkeypatch, extra_cells: tuple[str, ...] = ()):
    """notebooks/<name> executed top to bottom in a new kernel, with `extra_cells` run after its own cells."""
    # The kernel is a new process: point it at this checkout's package.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(REPO_ROOT / "notebooks" / name, as_version=4)
    assert not [cell for cell in notebook.cells if cell.cell_type == "code" and cell.outputs], "saved with outputs"
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in extra_cells]
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return notebook, outputs


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
    _, outputs = execute_notebook("rcpp_walkthrough.ipynb", tmp_path, monkeypatch)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # the scene and the three plots
    text = "".join(o.get("text", "") for o in outputs)
    assert "RCPP + DRCD" in text and "true objects:" in text


# Run after the pruners notebook's own cells: what its table and figures were drawn from, as JSON.
PRUNERS_PROBE = """
import json, rcpp_hf
print("PROBE" + json.dumps({
    "package": rcpp_hf.__file__, "budget": BUDGET, "num_visual": num_visual, "num_layers": num_layers,
    "refused": refused, "kv_bytes": prefill_kv_bytes, "prefill_ms": prefill_ms,
    "stages": {name: [(r.layer, r.kept, r.kept_visual_ids[0].tolist()) for r in out.pruning]
               for name, out in runs.items() if name != "vanilla"},
    "composed": COMPOSED, "left": left, "cached": cached, "evicted": [step.evicted[0].tolist() for step in trace.steps],
}))
"""
PRUNER_NAMES = ["fastv", "sparsevlm", "pdrop", "visionzip", "vispruner", "cdpruner", "himap", "random"]
AVERAGED = {"fastv", "pdrop", "random"}  # their budget is the average of visual tokens over the decoder's layers


def table_rows(outputs) -> dict[str, list[str]]:
    """The notebook's markdown table: method -> its cells."""
    (table,) = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    lines = table.splitlines()[2:]  # below the header and its rule
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def test_pruners_notebook_compares_the_eight_pruners_at_one_budget(tmp_path, monkeypatch):
    _, outputs = execute_notebook("pruners_side_by_side.ipynb", tmp_path, monkeypatch, (PRUNERS_PROBE,))
    text = "".join(o.get("text", "") for o in outputs)
    probe = json.loads(text.split("PROBE", 1)[1].splitlines()[0])
    assert Path(probe["package"]).resolve().is_relative_to(REPO_ROOT)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # the scene, the kept tokens, RCPP's evictions
    assert "CPU thread(s)" in text

    rows = table_rows(outputs)
    assert list(rows) == ["vanilla", *PRUNER_NAMES]  # vanilla, then one row per pruner
    budget, num_visual, num_layers = probe["budget"], probe["num_visual"], probe["num_layers"]
    count = resolve_budget(budget, num_visual)
    assert set(probe["refused"]) <= AVERAGED  # a count per layer the unpruned first layers exceed; never a kept count
    for name, reason in probe["refused"].items():
        assert rows[name][0] == f"refused: {reason}" and "unreachable" in reason
    assert set(probe["stages"]) == set(PRUNER_NAMES) - set(probe["refused"])
    for name, stages in probe["stages"].items():
        # The table shows what the library reported ...
        assert rows[name][0] == ", ".join(f"{kept} from layer {layer}" for layer, kept, _ in stages)
        for layer, kept, ids in stages:
            assert len(ids) == len(set(ids)) == kept and all(0 <= i < num_visual for i in ids)
        # ... and that is the budget asked, in each method's meaning of it.
        kept = [kept for _, kept, _ in stages]
        if name in ("visionzip", "vispruner", "cdpruner"):
            assert [(layer, n) for layer, n, _ in stages] == [(0, count)]
        elif name == "himap":
            assert kept[-1] == count  # img_rank, its second stage
        elif name == "sparsevlm":
            assert kept == list(sparsevlm_keep_counts(budget, num_visual))
        else:
            average = statistics.mean(visual_tokens_per_layer({l: n for l, n, _ in stages}, num_layers, num_visual))
            assert abs(average - count) <= 0.5 and rows[name][1] == f"{average:.2f}"
        assert probe["kv_bytes"][name] < probe["kv_bytes"]["vanilla"]  # every pruner shrinks the prefill's cache
    assert all(ms > 0 for ms in probe["prefill_ms"].values())
    assert all("names absent:" in rows[name][-1] for name in probe["kv_bytes"])

    # RCPP + DRCD on top of a pruner (FastV) evicted some of the tokens the pruner left; the cache holds the rest.
    composed = probe["composed"]
    assert composed == "fastv" or "fastv" in probe["refused"]
    evicted = [token for step in probe["evicted"] for token in step]
    assert evicted and len(evicted) == len(set(evicted)) == probe["left"] - probe["cached"][-1]
    assert set(evicted) <= set(probe["stages"][composed][-1][2])
    assert f"{composed} + RCPP + DRCD" in text
