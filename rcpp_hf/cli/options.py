"""Options several commands share: `--model` (a folder, a hub id or a built model's name), `--method NAME
[--method-config YAML]` (`rcpp_hf.run_config` reads the YAML) and the ShapesWorld commands' `--seed`."""

from __future__ import annotations

import argparse
from pathlib import Path

from rcpp_hf.default_model import default_model_path
from rcpp_hf.methods import METHODS
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED, TEST_SEED, TRAIN_SEED, VALIDATION_SEED
from rcpp_hf.smol.build import MODEL_NAME, build_smol_llava


def model_folder(model: str | Path | None) -> str:
    """A --model value as a checkpoint folder: None is the default model; "shapesworld-smol" (the ShapesWorld LLaVA
    on SmolLM2-135M-Instruct) is built from its GGUF file and the shipped delta on first use, then cached."""
    if model is None:
        return str(default_model_path())
    return str(build_smol_llava()) if str(model) == MODEL_NAME else str(model)


def add_world_seed_argument(parser: argparse.ArgumentParser, default: int = DEFAULT_WORLD_SEED) -> None:
    """`--seed`, the ShapesWorld world the scenes are drawn from; every command defaults to `DEFAULT_WORLD_SEED`
    but the sweep (the validation world)."""
    worlds = {TRAIN_SEED: "training", VALIDATION_SEED: "validation", TEST_SEED: "test"}
    parser.add_argument("--seed", type=int, default=default,
                        help=f"world seed of the scenes (default: {default}, the {worlds[default]} world; the "
                             f"worlds: " + ", ".join(f"{seed} {name}" for seed, name in worlds.items()) + ")")  # fmt: skip


def add_method_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--method", help=f"a registered method, run with its defaults or --method-config "
                        f"(known: {', '.join(METHODS)})")
    parser.add_argument("--method-config", help="YAML: a method preset with a 'method' key (e.g. "
                        "configs/fastv_128.yaml), or settings for --method")
