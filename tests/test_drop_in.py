"""Drop-in behaviour for a transformers user: the README's example is warning-free, our processors name the Pillow
backend they use, and `from_pretrained` of the subclass initialises missing weights exactly as the stock class."""

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from rcpp_hf import RCPPLlavaForConditionalGeneration
from rcpp_hf.tiny import save_tiny_llava
from tests.conftest import make_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    """The README's Python blocks: the quick start on the embedded model, then the same calls on a llava-hf id."""
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)


def run_warning_free(code: str, namespace: dict, caplog) -> dict:
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        exec(compile(code, "README.md", "exec"), namespace)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    return namespace


def test_readme_quick_start_runs_as_written_without_any_warning(caplog, capsys):
    namespace = run_warning_free(readme_python_blocks()[0], {}, caplog)
    assert namespace["out"].pruning  # the last `out` is FastV's, with its prune records
    assert namespace["tokens"].shape[0] == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == namespace["reference_caption"](namespace["scene"])
    assert "'evicted'" in printed[2]  # the trace's last step


def test_readme_llava_hf_example_runs_without_any_warning(tiny_path, caplog, tmp_path):
    code = readme_python_blocks()[1].replace('"llava-hf/llava-1.5-7b-hf"', repr(str(tiny_path)))
    assert "generation_config=config)" in code and "return_dict_in_generate=True)" in code  # the documented pattern
    photo = tmp_path / "photo.jpg"
    make_images(1)[0].save(photo)
    code = code.replace('"photo.jpg"', repr(str(photo))).replace("max_new_tokens=128", "max_new_tokens=12")
    code = code.replace("dtype=torch.float16, ", "")  # float16 matmuls are slow on a CPU; the call is the same
    namespace = run_warning_free(code, {}, caplog)
    assert namespace["out"].rcpp.steps and namespace["out"].sequences.shape[0] == 1


def test_generation_arguments_beside_a_config_do_warn(rcpp_model, batch1, caplog):
    """The check above can fail: transformers does warn when generation arguments come beside the config."""
    from rcpp_hf import RCPPGenerationConfig

    with caplog.at_level(logging.WARNING):
        rcpp_model.generate(**batch1, generation_config=RCPPGenerationConfig(max_new_tokens=2), return_dict_in_generate=True)
    assert any("is deprecated" in r.getMessage() for r in caplog.records)


def test_our_processors_load_without_the_torchvision_fallback_warning(tmp_path):
    """A fresh interpreter (transformers warns once per process): import the CLI, build and load a tiny model's
    processor and the shipped checkpoint's, as every command does."""
    script = f"""
from transformers import AutoProcessor
import rcpp_hf.cli
from rcpp_hf.default_model import default_model_path
from rcpp_hf.tiny import save_tiny_llava
for path in (default_model_path(), save_tiny_llava({str(tmp_path)!r})):
    print(type(AutoProcessor.from_pretrained(path).image_processor).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr + done.stdout
    try:
        import torchvision  # noqa: F401

        expected = "CLIPImageProcessor"
    except ImportError:
        expected = "CLIPImageProcessorPil"
    assert done.stdout.split() == [expected, expected]


# -- from_pretrained: the subclass takes the stock class's path ------------------------------------------------------

# Removed from the checkpoint file (keys as saved: transformers writes llava-hf's original layout).
MISSING = [
    "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
    "vision_tower.encoder.layers.0.self_attn.out_proj.weight",
    "vision_tower.encoder.layers.1.mlp.fc1.weight",
    "vision_tower.encoder.layers.1.mlp.fc2.bias",
    "vision_tower.embeddings.class_embedding",
    "vision_tower.embeddings.patch_embedding.weight",
    "vision_tower.embeddings.position_embedding.weight",
    "multi_modal_projector.linear_1.weight",
    "language_model.model.layers.1.self_attn.k_proj.weight",
    "language_model.model.layers.2.mlp.down_proj.weight",
    "language_model.lm_head.weight",
]


def load(cls, folder, seed=0):
    torch.manual_seed(seed)
    return cls.from_pretrained(folder, dtype=torch.float32)


def differing_parameters(a, b) -> list[str]:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    return [name for name in a_state if not torch.equal(a_state[name], b_state[name])]


def test_missing_weights_are_initialised_as_the_stock_class_does(tmp_path):
    folder = save_tiny_llava(tmp_path)
    complete = load(LlavaForConditionalGeneration, folder)
    weights = load_file(folder / "model.safetensors")
    assert set(MISSING) <= weights.keys()
    save_file({k: v for k, v in weights.items() if k not in MISSING}, folder / "model.safetensors", metadata={"format": "pt"})

    stock, ours = load(LlavaForConditionalGeneration, folder), load(RCPPLlavaForConditionalGeneration, folder)
    assert differing_parameters(stock, ours) == []
    # Every removed weight was initialised anew, and every other one is the checkpoint's (fc2's bias is zeros both
    # in the file and when initialised: one removed weight fewer differs).
    assert len(differing_parameters(complete, ours)) == len(MISSING) - 1
