"""The compiled build's rule, checked on the sources: an interpreted module must not
subclass a class of a compiled module (mypyc's native classes refuse it at import time,
``TypeError: interpreted classes cannot inherit from compiled``). CI tests the pure-Python
build, where nothing would fail: this test is what catches it there.
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


def _classes(module: str) -> set[str]:
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _violations(hot: set[str]) -> list[str]:
    compiled_classes = {module: _classes(module) for module in hot}
    found = []
    for path in sorted((ROOT / "dataplane").rglob("*.py")) + sorted((ROOT / "filters").rglob("*.py")):
        module = str(path.relative_to(ROOT))[:-3].replace("/", ".")
        if module in hot:
            continue
        tree = ast.parse(path.read_text())
        imported: dict[str, str] = {}  # local name -> compiled module it names a class of
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
    assert _violations(hot) == []


def test_the_check_finds_a_violation() -> None:
    # With the HTTP/2 server left out of the compiled set, its H2ServerStream (a Downstream of
    # the compiled router) is exactly the import-time failure.
    hot = _hot_modules() - {"dataplane.http2.server"}
    assert "dataplane.http2.server.H2ServerStream subclasses dataplane.router.Downstream" in _violations(hot)
