"""Shared fixtures: tiny LLaVA checkpoints saved to disk and loaded back, as a user's checkpoint would be."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import rcpp_hf
from rcpp_hf import RCPPGenerationConfig, RCPPLlavaForConditionalGeneration
from rcpp_hf.auto import RCPP_CLASSES
from rcpp_hf.shapesworld.model import SHAPESWORLD_SPEC, build_shapesworld_llava
from rcpp_hf.tiny import TinyLlavaSpec, save_tiny_llava

GQA_SPEC = TinyLlavaSpec()  # 4 query heads share 2 kv heads
# The first 60 questions of each official COCO POPE file (tests/fixtures/pope/README.md).
POPE_EXCERPT = Path(__file__).resolve().parent / "fixtures" / "pope"


@pytest.fixture(scope="session")
def pope_data() -> Path:
    """The committed POPE excerpt: every test that reads POPE questions reads these."""
    return POPE_EXCERPT


@pytest.fixture(scope="session")
def full_pope_data() -> Path:
    """The full POPE question files, when RCPP_HF_POPE_DATA names a folder holding them; skipped otherwise."""
    folder = os.environ.get("RCPP_HF_POPE_DATA")
    if not folder:
        pytest.skip("RCPP_HF_POPE_DATA is not set: the full POPE question files are optional")
    if not (Path(folder) / "coco_pope_adversarial.json").is_file():
        raise FileNotFoundError(f"RCPP_HF_POPE_DATA={folder} holds no coco_pope_adversarial.json")
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"), GQA_SPEC)


@pytest.fixture(scope="session")
def tiny_100_path(tmp_path_factory):
    """A tiny random LLaVA whose image has 100 visual tokens (ShapesWorld's count), 8 query heads (FinePruner's
    default H) and an 8-layer decoder: deep enough that the layers before FastV's stage (layer 1) hold less than its
    default budget, 128 / 576."""
    spec = replace(GQA_SPEC, image_size=40, patch_size=4, text_layers=8, num_heads=8)
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava-100"), spec)


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
        tau=0.5, lambda_start=0.2, lambda_end=0.8, keep_ratio_start=1.0, keep_ratio_end=0.25, schedule="linear",
        schedule_steps=4,
    )
    return RCPPGenerationConfig(**{**values, **overrides})


# -- evaluation harness (rcpp_hf.eval) -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def varied_tiny_path(tmp_path_factory) -> Path:
    """A tiny random LLaVA checkpoint folder whose answers depend on the image and the question.

    With the default initialisation (std 0.02) the tiny model answers every question alike; weights
    drawn with std 0.3 make answers differ, so that comparing two runs' answers means something.
    """
    folder = save_tiny_llava(tmp_path_factory.mktemp("varied-tiny-llava"))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    vary_weights(model)
    model.save_pretrained(folder)
    return folder


def vary_weights(model, std: float = 0.3, seed: int = 0) -> None:
    """Redraw every matrix of `model` with `std` (seeded), in place: a random model whose outputs depend on its inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def row_alone(batch: dict, row: int) -> dict:
    """Row `row` of a left-padded `batch` (input_ids, attention_mask, and one image per row: pixel_values, and
    image_sizes / batch_num_images for anyres models, image_grid_thw and mm_token_type_ids for Qwen, whose
    pixel_values are every image's patches in one tensor) without its padding, batch size 1."""
    real = batch["attention_mask"][row].bool()
    alone = {name: value[row : row + 1] for name, value in batch.items()}
    per_entry = [name for name in ("input_ids", "attention_mask", "mm_token_type_ids") if name in batch]
    alone.update({name: batch[name][row : row + 1, real] for name in per_entry})
    if "image_grid_thw" in batch:
        patches = batch["image_grid_thw"].prod(dim=1).tolist()
        alone["pixel_values"] = batch["pixel_values"].split(patches)[row]
    return alone


@pytest.fixture
def make_image_files():
    """make_image_files(folder, names, size=(40, 30)): noise images, each determined by its file name."""

    def make(folder: Path, names, size=(40, 30)) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in dict.fromkeys(names):
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            generator = torch.Generator().manual_seed(seed)
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / name)
            paths.append(folder / name)
        return paths

    return make


@pytest.fixture
def pope_files(pope_data, tmp_path, make_image_files):
    """The first 12 questions (2 images) of the adversarial and random POPE excerpts, and their images."""
    files = []
    for split in ("adversarial", "random"):
        lines = (pope_data / f"coco_pope_{split}.json").read_text().splitlines()[:12]
        path = tmp_path / "questions" / f"coco_pope_{split}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
        make_image_files(tmp_path / "val2014", [json.loads(line)["image"] for line in lines])
    return files, tmp_path / "val2014"


# -- ShapesWorld commands (rcpp_hf.shapesworld) --------------------------------------------------------------


@pytest.fixture(scope="session")
def shapesworld_small(tmp_path_factory) -> str:
    """A randomly initialised ShapesWorld LLaVA (its tokenizer and 16 visual tokens, a 4-layer decoder) saved to a
    folder: the testbed's commands run on it in seconds."""
    spec = replace(SHAPESWORLD_SPEC, image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32,
                   text_layers=4, num_heads=4, num_kv_heads=2)  # fmt: skip
    folder = tmp_path_factory.mktemp("shapesworld-small")
    model, processor = build_shapesworld_llava(spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


# -- LLaVA-NeXT and LLaVA-OneVision (rcpp_hf.tiny_families) --------------------------------------------------------

ANYRES_TYPES = ("llava_next", "llava_onevision")
# Image (height, width) pairs: different sizes give the rows different image-token counts (52 and 56 on the tiny
# models); equal sizes give equal counts (52).
RAGGED_SIZES = ((24, 40), (40, 24))
EQUAL_SIZES = ((24, 40), (24, 40))


@pytest.fixture(scope="session")
def anyres_paths(tmp_path_factory) -> dict[str, Path]:
    """model_type -> a tiny LLaVA-NeXT / LLaVA-OneVision folder with varied weights (its outputs depend on what it
    sees), saved and loaded back as a user's checkpoint."""
    from transformers import AutoModelForImageTextToText

    from rcpp_hf.tiny_families import save_tiny_family

    paths = {}
    for model_type in ANYRES_TYPES:
        folder = save_tiny_family(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        vary_weights(model)
        model.save_pretrained(folder)
        paths[model_type] = folder
    return paths


def sized_images(sizes) -> list[Image.Image]:
    """Deterministic noise images of the given (height, width) sizes."""
    generator = torch.Generator().manual_seed(len(sizes))
    return [Image.fromarray(torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy())
            for size in sizes]  # fmt: skip


def anyres_batch(path: Path, sizes) -> dict:
    """Two left-padded rows (PROMPTS) of the tiny anyres model at `path`, with images of `sizes`."""
    from transformers import AutoConfig

    from rcpp_hf.tiny_families import load_tiny_processor

    processor = load_tiny_processor(path, AutoConfig.from_pretrained(path))
    inputs = processor(images=sized_images(sizes), text=PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "fixture must exercise left padding"
    return dict(inputs)


# -- Qwen2-VL and Qwen2.5-VL (rcpp_hf.tiny_qwen) ---------------------------------------------------------------------

QWEN_TYPES = ("qwen2_5_vl", "qwen2_vl")
# Image (height, width) pairs: 15 and 20 visual tokens on the tiny Qwen models (patches of 4 pixels merged 2 x 2);
# equal sizes 15 each.
QWEN_RAGGED_SIZES = ((24, 40), (32, 40))
QWEN_EQUAL_SIZES = ((24, 40), (24, 40))


@pytest.fixture(scope="session")
def qwen_paths(tmp_path_factory) -> dict[str, Path]:
    """model_type -> a tiny Qwen2.5-VL / Qwen2-VL folder with varied weights, saved and loaded back."""
    from transformers import AutoModelForImageTextToText

    from rcpp_hf.tiny_qwen import save_tiny_qwen

    paths = {}
    for model_type in QWEN_TYPES:
        folder = save_tiny_qwen(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        vary_weights(model)
        model.save_pretrained(folder)
        paths[model_type] = folder
    return paths


def qwen_batch(path: Path, model_type: str, sizes=QWEN_RAGGED_SIZES) -> dict:
    """Two left-padded rows (PROMPTS, Qwen's image markers for `<image>`) of the tiny Qwen model at `path`, with
    images of `sizes`: input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw."""
    from rcpp_hf.tiny_qwen import QWEN_IMAGE, load_tiny_qwen_processor

    processor = load_tiny_qwen_processor(path, model_type)
    texts = [prompt.replace("<image>", QWEN_IMAGE) for prompt in PROMPTS]
    inputs = processor(images=sized_images(sizes), text=texts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "fixture must exercise left padding"
    return dict(inputs)


def load_pair(path, model_type, implementation="sdpa", seed=0):
    """(stock class, rcpp_hf class) loaded from `path` with the same seed, so weights missing from it match."""
    ours_class = RCPP_CLASSES[model_type]
    torch.manual_seed(seed)
    stock = ours_class.family_class.stock_class.from_pretrained(path, attn_implementation=implementation)
    torch.manual_seed(seed)
    ours = rcpp_hf.from_pretrained(path, attn_implementation=implementation)
    assert type(ours) is ours_class
    return stock.eval(), ours.eval()


def assert_same_weights(expected, model) -> None:
    """Every parameter and buffer of `model` equals `expected`'s, under the same names."""
    expected_state, state = expected.state_dict(), model.state_dict()
    assert expected_state.keys() == state.keys()
    assert [name for name in expected_state if not torch.equal(expected_state[name], state[name])] == []
