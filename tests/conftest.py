from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real POPE question files live beside the repository and are never committed into it.
POPE_DATA = REPO_ROOT.parent / "shared" / "data" / "pope"


@pytest.fixture(scope="session")
def pope_data() -> Path:
    if not (POPE_DATA / "coco_pope_adversarial.json").exists():
        raise FileNotFoundError(f"the real POPE question files are expected in {POPE_DATA}")
    return POPE_DATA
