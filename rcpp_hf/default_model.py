"""Where the embedded default model lives: what `rcpp-hf` commands use when no --model is given.

The default is the ShapesWorld LLaVA shipped inside the package (`rcpp_hf/shapesworld/checkpoint/`,
trained by `rcpp-hf shapesworld train`): loadable offline with `from_pretrained(default_model_path())`. `model_folder` also resolves the name
"shapesworld-smol" (`rcpp_hf/smol/`).
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


def model_folder(model: str | Path | None) -> str:
    """A --model value as a checkpoint folder: None is the default model; "shapesworld-smol" (the ShapesWorld LLaVA
    on SmolLM2-135M-Instruct) is built from its GGUF file and the shipped delta on first use, then cached."""
    if model is None:
        return str(default_model_path())
    from rcpp_hf.smol.build import MODEL_NAME, build_smol_llava

    return str(build_smol_llava()) if str(model) == MODEL_NAME else str(model)
