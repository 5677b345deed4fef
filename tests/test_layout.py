"""The package's import structure: no import cycle, and handler modules share code through
modules of their own (auth, submit, ...), never by importing one another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ingest"
# Modules holding request handlers; only the route tables import them.
HANDLERS = {
    "ingest.geofences_api",
    "ingest.ingest_api",
    "ingest.nearby",
    "ingest.read_api",
    "ingest.trips_api",
    "ingest.trip_summary",
    "ingest.ws",
    "ingest.phone_apps.osmand",
    "ingest.phone_apps.overland",
    "ingest.phone_apps.owntracks",
}
ROUTE_TABLES = {"ingest.app", "ingest.phone_apps"}
# The entry point imports the service only once the settings are read, so that a settings
# error is printed before aiohttp and asyncpg are loaded.
LAZY = {("ingest.__main__", "ingest.cli")}


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = set()
    for alias in node.names:
        if f"{prefix}.{alias.name}" in MODULES:  # from . import auth
            out.add(f"{prefix}.{alias.name}")
        elif prefix in MODULES:  # from .auth import Principal
            out.add(prefix)
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(imports run when the module loads, imports inside functions). Imports under
    `if TYPE_CHECKING:` are left out: they never run, they only name types (typedefs.py)."""
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit_one(sub, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            (lazy if in_function else top).update(_targets(module, node) - {module})
        in_function = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        visit(node, in_function)

    visit(ast.parse(MODULES[module].read_text()), False)
    return top, lazy


GRAPH = {m: _imports(m) for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_the_package():
    assert {"ingest.auth", "ingest.settings", "ingest.jwt_keys", "ingest.submit"} <= set(MODULES)
    assert set(MODULES) >= HANDLERS
    assert "ingest.jwt_keys" in GRAPH["ingest.settings"][0]
    assert "ingest.submit" in GRAPH["ingest.phone_apps.common"][0]


def test_no_import_cycle():
    # Lazy imports count too: moving an import into a function hides a cycle, not breaks it.
    graph = {m: top | lazy for m, (top, lazy) in GRAPH.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_cycle_detection_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_inside_a_function_but_the_entry_point():
    lazy = {(m, target) for m, (_, targets) in GRAPH.items() for target in targets}
    assert lazy == LAZY


def test_handler_modules_never_import_one_another():
    for module, (top, lazy) in GRAPH.items():
        if module not in ROUTE_TABLES:
            assert not (top | lazy) & HANDLERS, f"{module} imports {(top | lazy) & HANDLERS}"


def test_key_loading_imports_nothing_of_the_service():
    """settings and auth both import jwt_keys; it must not import either."""
    top, lazy = GRAPH["ingest.jwt_keys"]
    assert not top | lazy
