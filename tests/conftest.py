import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from rcpp_hf.tiny import save_tiny_llava

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real POPE question files live beside the repository and are never committed into it.
POPE_DATA = REPO_ROOT.parent / "shared" / "data" / "pope"


@pytest.fixture(scope="session")
def pope_data() -> Path:
    if not (POPE_DATA / "coco_pope_adversarial.json").exists():
        raise FileNotFoundError(f"the real POPE question files are expected in {POPE_DATA}")
    return POPE_DATA


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random LLaVA checkpoint folder (model + processor) whose answers depend on image and question.

    With the default initialisation (std 0.02) the tiny model answers every question alike; weights
    drawn with std 0.3 make answers differ, so that comparing two runs' answers means something.
    """
    folder = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def make_images():
    """make_images(folder, names, size=(40, 30)): noise images, each determined by its file name."""

    def make(folder: Path, names, size=(40, 30)) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in dict.fromkeys(names):
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
            paths.append(folder / name)
        return paths

    return make


@pytest.fixture
def pope_files(pope_data, tmp_path, make_images):
    """The first 12 questions (2 images) of the real adversarial and random files, and their images."""
    files = []
    for split in ("adversarial", "random"):
        lines = (pope_data / f"coco_pope_{split}.json").read_text().splitlines()[:12]
        path = tmp_path / "questions" / f"coco_pope_{split}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
        make_images(tmp_path / "val2014", [json.loads(line)["image"] for line in lines])
    return files, tmp_path / "val2014"
