"""The compiled build's rule, checked on the sources: an interpreted module (the rest of the
packages, and the tests, fuzzers and benchmarks that run against a compiled build) must not
subclass a class of a compiled module (mypyc's native classes refuse it,
``TypeError: interpreted classes cannot inherit from compiled``) unless that class says
``@mypyc_attr(allow_interpreted_subclasses=True)``. CI tests the pure-Python build, where
nothing would fail: this test is what catches it there.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _hot_modules() -> set[str]:
    source = (ROOT / "setup.py").read_text()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "HOT_MODULES"
                                                for t in node.targets):
            paths = ast.literal_eval(node.value)
            return {p[:-3].replace("/", ".") for p in paths}
    raise AssertionError("setup.py has no HOT_MODULES list")


def _open_to_subclasses(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                and decorator.func.id == "mypyc_attr"):
            for keyword in decorator.keywords:
                if (keyword.arg == "allow_interpreted_subclasses" and isinstance(keyword.value, ast.Constant)
                        and keyword.value.value is True):
                    return True
    return False


def _classes(module: str) -> set[str]:
    """The classes of a compiled module that interpreted code cannot subclass."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and not _open_to_subclasses(node)}


def _interpreted_sources(hot: set[str]) -> dict[str, str]:
    """Module name -> source of every module that runs interpreted beside a compiled build."""
    sources = {}
    for top in ("dataplane", "filters", "tests", "fuzz", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = str(path.relative_to(ROOT))[:-3].replace("/", ".")
            if module not in hot:
                sources[module] = path.read_text()
    return sources


def _violations(hot: set[str], sources: dict[str, str]) -> list[str]:
    compiled_classes = {module: _classes(module) for module in hot}
    found = []
    for module, source in sources.items():
        tree = ast.parse(source)
        imported: dict[str, str] = {}  # local name -> compiled module it names a closed class of
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in compiled_classes:
                for alias in node.names:
                    if alias.name in compiled_classes[node.module]:
                        imported[alias.asname or alias.name] = node.module
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    if isinstance(base, ast.Name) and base.id in imported:
                        found.append(f"{module}.{node.name} subclasses {imported[base.id]}.{base.id}")
    return found


def test_no_interpreted_class_subclasses_a_compiled_one() -> None:
    hot = _hot_modules()
    assert "dataplane.router" in hot and "dataplane.http2.server" in hot
    sources = _interpreted_sources(hot)
    assert "tests.unit.dataplane.test_router" in sources  # its test doubles subclass compiled classes
    assert _violations(hot, sources) == []


def test_the_check_finds_a_violation() -> None:
    # A double of the router itself (closed) is refused; one of Downstream, which is open to
    # interpreted subclasses, is not.
    source = (
        "from dataplane.router import Downstream, Router\n"
        "class FakeRouter(Router):\n    pass\n"
        "class FakeDownstream(Downstream):\n    pass\n"
    )
    assert _violations(_hot_modules(), {"tests.double": source}) == [
        "tests.double.FakeRouter subclasses dataplane.router.Router"]
