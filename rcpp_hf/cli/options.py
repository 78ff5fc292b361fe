"""Options several commands share: `--model` (a folder, a hub id or a built model's name), `--method NAME
[--method-config YAML]` (`rcpp_hf.run_config` reads the YAML), and the checks of `--model`, `--device` and counts
such as `--max-new-tokens` that each command runs before it loads a model, and the ShapesWorld commands' `--seed`."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers.utils import cached_file

from rcpp_hf.cli.errors import UsageError, hub_fix, one_line
from rcpp_hf.default_model import default_model_path
from rcpp_hf.engine.pruning import OWN_HEADS, OWN_LAYERS, SCALED_LAYERS  # noqa: F401 (the layer and head flags' rules)
from rcpp_hf.methods import METHODS
from rcpp_hf.methods.budget import budget_argument  # noqa: F401 (the budget flags' type, with their help)
from rcpp_hf.shapesworld.world import DEFAULT_WORLD_SEED, TEST_SEED, TRAIN_SEED, VALIDATION_SEED
from rcpp_hf.smol.build import MODEL_NAME, build_smol_llava

# What the hub accepts as a repo id ("llava-hf/llava-1.5-7b-hf"; a legacy id has no namespace, e.g. "gpt2").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
MODEL_FORMS = f"a checkpoint folder, a hub id (org/name) or {MODEL_NAME}"
HUB_HTTP_LOGGER = "huggingface_hub.utils._http"  # warns of each retry of a request the hub did not answer


# Every budget flag's help says the rule (`methods/budget.py`).
BUDGET_HELP = ("an integer counts visual tokens of the model's own image, a fraction in (0, 1) is a share of them "
               "(LLaVA-1.5's 64 / 128 / 192 of 576 are 0.1111 / 0.2222 / 0.3333)")
# Every layer or head flag's help says which it takes (`engine/pruning.py`'s phrases).
LAYER_HELP = OWN_LAYERS


def model_folder(model: str | Path | None) -> str:
    """A --model value as a checkpoint folder: None is the default model; "shapesworld-smol" (the ShapesWorld LLaVA
    on SmolLM2-135M-Instruct) is built from its GGUF file and the shipped delta on first use, then cached.

    A value that is neither an existing folder nor shaped like a hub id is refused here, before anything loads:
    transformers would otherwise try it as a hub id and say only that the id is malformed. A hub id is checked by
    fetching its config.json (from the local hub cache, or the hub unless offline), so that an id that does not
    exist or cannot be reached is refused in one line (`check_hub_model`) instead of transformers' traceback."""
    if model is None:
        return str(default_model_path())
    if str(model) == MODEL_NAME:
        return str(build_smol_llava())
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: not a checkpoint folder (no config.json in it); pass {MODEL_FORMS}")
        return str(model)
    if path.exists():
        raise UsageError(f"--model {model}: is a file, not a checkpoint folder; pass {MODEL_FORMS}")
    if str(model).startswith((".", "~", os.sep, "/")) or not HUB_ID.fullmatch(str(model)):
        raise UsageError(f"--model {model}: folder does not exist; pass {MODEL_FORMS}")
    check_hub_model(str(model))  # a hub id: only the hub (or its local cache) can say whether it exists
    return str(model)


def hub_reason(model_id: str, error: OSError) -> tuple[str, str]:
    """Why transformers could not fetch `model_id`'s config.json (its OSError wraps huggingface_hub's error as
    __cause__) and what to do, each a clause of the one line."""
    cause = error.__cause__
    if isinstance(cause, GatedRepoError):
        fix = f"request access at https://huggingface.co/{model_id} and log in (hf auth login), or pass a local folder"
        return "it is a gated model", fix
    if isinstance(cause, RepositoryNotFoundError):
        fix = "check the id (org/name), log in (hf auth login) for a private model, or pass a local checkpoint folder"
        return "the hub has no model of that id, or it is private", fix
    if isinstance(cause, LocalEntryNotFoundError) and hub_constants.HF_HUB_OFFLINE:
        fix = "check the id, unset HF_HUB_OFFLINE to download it, or pass a local checkpoint folder"
        return "it is not in the local hub cache, and HF_HUB_OFFLINE=1 forbids downloading it", fix
    if isinstance(cause, LocalEntryNotFoundError):
        return "the hub could not be reached and it is not in the local hub cache", hub_fix()
    if cause is None and "config.json" in str(error):  # transformers' own "does not appear to have a file named"
        fix = "check the id, or pass a local checkpoint folder"
        return "the hub repository has no config.json: not a transformers checkpoint", fix
    return one_line(error), hub_fix()


def check_hub_model(model_id: str) -> None:
    """Refuse a hub id whose config.json cannot be had (from the local hub cache, or the hub unless HF_HUB_OFFLINE
    is set), naming the id, why, and what to do; downloads nothing more than the config. huggingface_hub's
    warnings of its retries are held back meanwhile: the outcome is this one line."""
    http_logger = logging.getLogger(HUB_HTTP_LOGGER)
    level = http_logger.level
    http_logger.setLevel(logging.ERROR)
    try:
        cached_file(model_id, "config.json")
    except OSError as error:
        reason, fix = hub_reason(model_id, error)
        raise UsageError(f"--model {model_id}: could not be loaded from the hub or a local folder ({reason}); "
                         f"{fix}") from error
    finally:
        http_logger.setLevel(level)


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | None) -> str | None:
    """`device` when this machine has it (None: the command chooses), else a UsageError naming those it has: torch
    would only fail later, after the model has loaded, with a message about its build."""
    if device is None:
        return None
    available = available_devices()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device name; available here: {', '.join(available)}") from None
    name = parsed.type if parsed.index is None or parsed.type == "cpu" else f"{parsed.type}:{parsed.index}"
    if name not in available:
        raise UsageError(f"--device {device}: not available on this machine; available here: {', '.join(available)}")
    return device


def check_at_least(value: int | None, minimum: int, flag: str) -> None:
    """Refuse a count below `minimum` (None: the command's default), naming the flag."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} {value}: must be at least {minimum}")


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
    parser.add_argument("--method-config", help="a method preset: a shipped name (e.g. fastv_128of576) or a "
                        "YAML path (a 'method' key and its settings, or settings for --method)")
