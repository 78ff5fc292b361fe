"""Where the embedded default model lives: what `rcpp-hf` commands use when no --model is given.

The default is the ShapesWorld LLaVA shipped inside the package (`rcpp_hf/shapesworld/checkpoint/`,
trained by `rcpp-hf shapesworld train`): loadable offline with `from_pretrained(default_model_path())`. The command
line's `--model` also takes the name "shapesworld-smol" (`rcpp_hf.cli.options.model_folder`).
"""

from __future__ import annotations

from pathlib import Path

SHAPESWORLD_CHECKPOINT = Path(__file__).parent / "shapesworld" / "checkpoint"


def default_model_path() -> Path:
    """Folder of the default checkpoint (model + processor), loadable with `from_pretrained`."""
    if not (SHAPESWORLD_CHECKPOINT / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{SHAPESWORLD_CHECKPOINT / 'model.safetensors'} is missing: the package was installed without its "
            "checkpoint (package_data); reinstall it, or pass --model"
        )
    return SHAPESWORLD_CHECKPOINT

