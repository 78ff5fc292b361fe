"""The shipped delta: everything the SmolLM2 ShapesWorld LLaVA adds to its two pretrained parts.

A folder of two files: `delta.safetensors` (float16) holds the multimodal projector (`projector.*`, LLaVA-1.5's
two-layer GELU MLP from the ShapesWorld vision tower's width to SmolLM2's), the LoRA factors of the language
model's projections (`lora.<module>.lora_A` (rank, in) / `.lora_B` (out, rank)) and the embedding row of the
added `<image>` token (`image_token_embedding`, (1, hidden): tied to the output layer, so it is the token's output
row too); `recipe.json` (`DeltaRecipe`) says how to apply them and which GGUF file they were trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rcpp_hf.smol.lora import LORA_TARGETS

WEIGHTS_FILE = "delta.safetensors"
RECIPE_FILE = "recipe.json"
PROJECTOR_PREFIX = "projector."
LORA_PREFIX = "lora."
IMAGE_ROW = "image_token_embedding"


@dataclass(frozen=True)
class DeltaRecipe:
    """How a delta is applied: LoRA rank / alpha (merge scale alpha / rank) and the base it belongs to."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS
    base_sha256: str | None = None  # the GGUF file trained on; the builder refuses another (None: not checked)
    training: dict = field(default_factory=dict)  # the training run's config and time, recorded

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if not self.targets or unknown:
            raise ValueError(f"targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def save_delta(folder: str | Path, tensors: dict[str, torch.Tensor], recipe: DeltaRecipe) -> Path:
    """Write `tensors` (float16) and `recipe` into `folder`; byte-identical for identical inputs."""
    unknown = [n for n in tensors if not n.startswith((PROJECTOR_PREFIX, LORA_PREFIX)) and n != IMAGE_ROW]
    if unknown:
        raise ValueError(f"not delta tensors: {unknown[:5]}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = {name: tensors[name].detach().to(torch.float16).contiguous() for name in sorted(tensors)}
    save_file(half, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / RECIPE_FILE).write_text(json.dumps(asdict(recipe), indent=1, sort_keys=True) + "\n")
    return folder


def load_delta(folder: str | Path) -> tuple[dict[str, torch.Tensor], DeltaRecipe]:
    """(float32 tensors, recipe) of a delta folder; FileNotFoundError naming the missing file."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, RECIPE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in the delta folder {folder}")
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["targets"] = tuple(recipe["targets"])
    tensors = {name: t.float() for name, t in load_file(folder / WEIGHTS_FILE).items()}
    return tensors, DeltaRecipe(**recipe)


def delta_hash(folder: str | Path) -> str:
    """A short content hash of a delta folder (its two files): names the cache folder of the built model."""
    digest = hashlib.sha256()
    for name in (RECIPE_FILE, WEIGHTS_FILE):
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]
