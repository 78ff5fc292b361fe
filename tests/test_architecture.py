"""The package's shape, checked from its source: which top-level parts import which (function-level imports
included), and how long its functions are. A part is a subpackage or a top-level module of rcpp_hf."""

import ast
import inspect
from collections import defaultdict
from pathlib import Path

import rcpp_hf
from rcpp_hf.modeling import MethodsGenerationMixin

PACKAGE = Path(rcpp_hf.__file__).parent
# The bottom layer: the decoder, cache and attention machinery every method and family builds on.
ENGINE = "engine"
MAX_FUNCTION_LINES = 80
MAX_SAMPLE_LINES = 60


def part_of(module: str) -> str:
    """rcpp_hf.engine.decoder -> engine; rcpp_hf.config -> config; rcpp_hf -> the package itself ("")."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(tree: ast.AST):
    """Every rcpp_hf module an `import` or `from ... import` anywhere in `tree` names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rcpp_hf"):
            names = [f"rcpp_hf.{alias.name}" for alias in node.names] if node.module == "rcpp_hf" else [node.module]
            yield from names
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("rcpp_hf."))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """part -> {imported part: [files that import it]}, between distinct parts."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = part_of(".".join(relative.parts).removesuffix(".__init__"))
        for module in imported_modules(ast.parse(path.read_text())):
            target = part_of(module)
            if target != source:
                graph[source][target].append(str(path.relative_to(PACKAGE.parent)))
    return {source: dict(targets) for source, targets in graph.items()}


def test_the_engine_imports_nothing_above_it():
    assert import_graph().get(ENGINE, {}) == {}


def test_no_two_parts_import_each_other():
    graph = import_graph()
    mutual = sorted(
        f"{a} <-> {b} ({graph[a][b][0]}, {graph[b][a][0]})"
        for a in graph
        for b in graph[a]
        if a < b and a in graph.get(b, {})
    )
    assert mutual == []


def function_lengths():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    assert {where: length for where, length in function_lengths() if length > MAX_FUNCTION_LINES} == {}


def test_the_decoding_loop_is_short():
    lines, _ = inspect.getsourcelines(MethodsGenerationMixin._sample)
    assert len(lines) <= MAX_SAMPLE_LINES


def test_each_model_class_is_its_familys_stock_class_with_the_loop():
    classes = MethodsGenerationMixin.__subclasses__()
    assert classes, "no model class uses the methods' loop"
    for cls in classes:
        assert issubclass(cls, cls.family_class.stock_class) and cls.__mro__[1] is MethodsGenerationMixin
