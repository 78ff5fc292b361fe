"""Where the embedded default model lives: what `rcpp-hf` commands use when no --model is given.

Until the ShapesWorld checkpoint ships inside the package, the default is the tiny random model of
`rcpp_hf.tiny`, built once into the user's cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from rcpp_hf.tiny import TinyLlavaSpec, save_tiny_llava


def cache_dir() -> Path:
    return Path(os.environ.get("RCPP_HF_CACHE", Path.home() / ".cache" / "rcpp_hf"))


def default_model_path() -> Path:
    """Folder of the default checkpoint (model + processor), loadable with `from_pretrained`."""
    folder = cache_dir() / "tiny-llava"
    if not (folder / "model.safetensors").exists():
        save_tiny_llava(folder, TinyLlavaSpec())
    return folder
