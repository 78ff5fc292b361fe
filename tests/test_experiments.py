"""The studies in `experiments/` stay outside the package: rcpp_hf imports none of them, each script imports rcpp_hf
and no sibling, and the scripts with a command line run as plain files with only rcpp_hf importable (as after
`pip install -e .`)."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rcpp_hf

PACKAGE = Path(rcpp_hf.__file__).parent
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(path for path in EXPERIMENTS.glob("*.py") if path.name != "__init__.py")
COMMAND_LINES = ["defaults_sweep.py", "head_ablation.py", "condensation.py", "pdrop_positions.py", "fastv_variants.py"]


def top_level_imports(path: Path) -> set[str]:
    """The first component of every module an `import` or absolute `from ... import` anywhere in `path` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_the_package_imports_no_experiment():
    assert [str(path) for path in PACKAGE.rglob("*.py") if "experiments" in top_level_imports(path)] == []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_a_script_imports_rcpp_hf_and_no_sibling(script):
    siblings = {path.stem for path in SCRIPTS} | {"experiments", "."}
    imports = top_level_imports(script)
    assert "rcpp_hf" in imports and not imports & siblings


@pytest.mark.parametrize("name", COMMAND_LINES)
def test_a_script_runs_as_a_file_with_only_the_package_importable(name, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "rcpp_hf").symlink_to(PACKAGE, target_is_directory=True)  # this checkout's package, nothing else
    environment = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, str(EXPERIMENTS / name), "--help"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"python experiments/{name}" in result.stdout and "--output-dir" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_script_imports(script):
    """Every name a script imports from rcpp_hf still exists (a moved function fails here, not at its next run)."""
    spec = importlib.util.spec_from_file_location(f"experiment_{script.stem}", script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
