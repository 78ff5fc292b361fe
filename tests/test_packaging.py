"""Packaging: a user who installs the library does not get the test tools; `pip install -e ".[test]"` does."""

import configparser
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = {"pytest", "nbclient", "nbformat", "ipykernel"}


def requirement_names(value: str) -> set[str]:
    """Package names of a setup.cfg requirement list (one per line, comments and blank lines skipped)."""
    lines = (line.split("#")[0].strip() for line in value.splitlines())
    return {re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower() for line in lines if line}


def test_test_only_packages_are_an_extra_not_runtime_requirements():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    runtime = requirement_names(setup["options"]["install_requires"])
    assert {"torch", "transformers", "pillow"} <= runtime
    assert runtime.isdisjoint(TEST_ONLY)
    assert requirement_names(setup["options.extras_require"]["test"]) == TEST_ONLY


def test_readme_and_ci_install_the_test_extra_before_running_the_tests():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1)
    assert 'pip install -e ".[test]" && python -m pytest -q tests' in commands
    assert '-e ".[test]"' in (REPO_ROOT / ".ci" / "run").read_text()


def test_the_wheel_carries_every_shipped_preset():
    """A wheel holds what setup.cfg's package data names: every preset file must match it (CI installs the wheel
    and reads a preset by name from an empty folder)."""
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    patterns = [p.strip() for p in setup["options.package_data"]["rcpp_hf.presets"].split(",")]
    presets = REPO_ROOT / "rcpp_hf" / "presets"
    files = sorted(p.relative_to(presets) for p in presets.rglob("*") if p.is_file() and p.suffix != ".py"
                   and "__pycache__" not in p.parts)  # fmt: skip
    assert files and all(any(f.match(pattern) for pattern in patterns) for f in files)
