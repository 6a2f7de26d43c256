"""No import circles among the project's modules, and the packages' directions hold.

Every import counts: at module level, under ``TYPE_CHECKING`` and inside functions. A
circle means a reader cannot tell which module is the lower layer; dependencies point one
way, down the pipeline (servers -> router -> upstream interface <- clients).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("filters", "dataplane", "controlplane", "remocal", "turnout")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
               if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for imported in targets:
                # The module itself, or the package a name was imported from.
                target = imported
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_init(graph: dict[str, set[str]], name: str) -> bool:
    return any(other.startswith(name + ".") for other in graph)


def test_no_import_circles() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its modules is not a circle of the modules themselves.
    trimmed = {name: {t for t in targets if not (_is_package_init(graph, t) and name.startswith(t + "."))}
               for name, targets in graph.items()}
    assert _cycles(trimmed) == []


def test_the_check_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_packages_point_one_way() -> None:
    graph = _graph()
    for name, targets in graph.items():
        top = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if top == "filters":
                assert other == "filters", f"{name} imports {target}: filters is pure and imports no other package"
            if top == "dataplane":
                assert other != "controlplane", f"{name} imports {target}: the data plane never imports the other"
            if top == "controlplane":
                assert other != "dataplane", f"{name} imports {target}: the control plane never imports the other"
            if top in ("filters", "dataplane", "controlplane"):
                # remocal (turnout connect and gateway) builds on the data and control planes, never the reverse.
                assert other != "remocal", f"{name} imports {target}: remocal sits above the data and control planes"


def test_the_request_path_points_down() -> None:
    graph = _graph()
    lower = {"dataplane.upstream", "dataplane.message", "dataplane.http1.client", "dataplane.http2.client",
             "dataplane.pool", "dataplane.upstreams"}
    servers = {"dataplane.http1.server", "dataplane.http2.server"}
    for name in lower:
        assert not graph[name] & (servers | {"dataplane.router", "dataplane.proxy"}), (name, graph[name])
    assert "dataplane.router" not in graph["dataplane.http1.client"] | graph["dataplane.http2.client"]
