"""Shared fixtures: tiny LLaVA checkpoints saved to disk and loaded back, as a user's checkpoint would be."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.tiny import TinyLlavaSpec, save_tiny_llava

warnings.filterwarnings("ignore", message=".*requires torchvision.*")

GQA_SPEC = TinyLlavaSpec()  # 4 query heads share 2 kv heads
REPO_ROOT = Path(__file__).resolve().parents[1]
# The real POPE question files live in ../shared/data/pope beside the repository (never committed into it);
# RCPP_HF_POPE_DATA points elsewhere.
POPE_CANDIDATES = [Path(p) for p in [os.environ.get("RCPP_HF_POPE_DATA")] if p] + [
    parent / "shared" / "data" / "pope" for parent in REPO_ROOT.parents
]


@pytest.fixture(scope="session")
def pope_data() -> Path:
    for folder in POPE_CANDIDATES:
        if (folder / "coco_pope_adversarial.json").exists():
            return folder
    raise FileNotFoundError(f"the real POPE question files are expected in one of {POPE_CANDIDATES}")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), GQA_SPEC)


@pytest.fixture(scope="session")
def processor(tiny_path):
    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def vanilla_model(tiny_path):
    return LlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def rcpp_model(tiny_path):
    return RCPPLlavaForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()


def make_images(count: int) -> list[Image.Image]:
    """Distinct, deterministic images of different sizes (the processor resizes them)."""
    generator = torch.Generator().manual_seed(count)
    images = []
    for index in range(count):
        pixels = torch.randint(0, 256, (24 + 8 * index, 40, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy()))
    return images


PROMPTS = [
    "USER: <image>\nDescribe the image in detail please. ASSISTANT:",
    "USER: <image>\nIs there a cat? ASSISTANT:",
]


@pytest.fixture(scope="session")
def batch1(processor):
    return processor(images=make_images(1), text=PROMPTS[:1], return_tensors="pt")


@pytest.fixture(scope="session")
def batch2(processor):
    """Two rows of different lengths: the second is left-padded."""
    inputs = processor(images=make_images(2), text=PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "fixture must exercise left padding"
    return inputs


def neutral_config(**overrides) -> RCPPGenerationConfig:
    values = dict(lambda_start=0.0, lambda_end=0.0, keep_ratio_start=1.0, keep_ratio_end=1.0, tau=-1.0)
    return RCPPGenerationConfig(**{**values, **overrides})


def active_config(**overrides) -> RCPPGenerationConfig:
    """Contrast and eviction both active on the tiny model. Its scores sit near 0.5, so tau = 0.5 splits them."""
    values = dict(
        tau=0.5, lambda_start=0.2, lambda_end=0.8, keep_ratio_start=1.0, keep_ratio_end=0.25, schedule_steps=4
    )
    return RCPPGenerationConfig(**{**values, **overrides})
