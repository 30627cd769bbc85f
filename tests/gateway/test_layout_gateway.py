"""The gateway package's layout, checked on its source with ``ast``.

* the protocol core (relay, halves, connection objects, frame rules, request context
  and handlers, decisions, config state) imports no trio, directly or through another
  gateway module: it runs on an injected clock and spawner;
* the gateway's modules import each other without cycles (lazy and ``TYPE_CHECKING``
  imports count: a cycle hidden in a function is still a cycle);
* no gateway module imports another module's private (``_x``) name;
* no module longer than ~600 lines goes without a theory-of-operation header;
* nothing cites a file that lives outside the repository.

A subpackage (``h2core``, the nghttp2 HTTP/2 core) counts as one module of the graph;
its own relative imports are read as the absolute ones they stand for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"

# The sans-IO protocol core: everything here must run without an event loop.
CORE = {
    "_authz", "_config", "_context", "_deadlines", "_decision", "_errors", "_extauthz", "_flags", "_frames", "_h1",
    "_guards", "_h2", "_half", "_handlers", "_istio", "_mirror", "_normalize", "_propagation", "_proxy", "_relay",
    "_resilience", "_retry", "_routes", "_tracing",
    "_sanitize", "_state", "_summaries", "_telemetry", "h2core",
}
SUBPACKAGES = ("h2core",)
EVENT_LOOPS = {"trio", "anyio", "asyncio"}


def _modules() -> dict[str, ast.Module]:
    mods = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(GATEWAY.glob("*.py"))}
    for pkg in SUBPACKAGES:
        body: list[ast.stmt] = []
        for p in sorted((GATEWAY / pkg).glob("*.py")):
            body.extend(_absolute(ast.parse(p.read_text(), str(p)), pkg).body)
        mods[pkg] = ast.Module(body=body, type_ignores=[])
    return mods


class _Absolute(ast.NodeTransformer):
    """A subpackage's relative imports as absolute ones (``from . import _x`` becomes
    ``import gateway.pkg._x``: a sibling module, not a private name)."""

    def __init__(self, pkg: str) -> None:
        self.pkg = pkg

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if not node.level:
            return node
        base = f"gateway.{self.pkg}" if node.level == 1 else "gateway"
        if node.module is None and node.level == 1:
            return ast.Import(names=[ast.alias(f"{base}.{a.name}") for a in node.names])
        module = f"{base}.{node.module}" if node.module else base
        return ast.ImportFrom(module=module, names=node.names, level=0)


def _absolute(tree: ast.Module, pkg: str) -> ast.Module:
    return _Absolute(pkg).visit(tree)  # type: ignore[no-any-return]


def _imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(absolute module, names imported from it) for every import in the file, wherever."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level == 1, "gateway is one flat package"
                base = f"gateway.{node.module}" if node.module else "gateway"
            else:
                base = node.module or ""
            out.append((base, [a.name for a in node.names]))
    return out


def _internal(module: str, names: list[str]) -> set[str]:
    """The gateway modules an import refers to."""
    if module == "gateway":
        return {n for n in names if (GATEWAY / f"{n}.py").exists() or n in SUBPACKAGES}
    if module.startswith("gateway."):
        return {module.split(".")[1]}
    return set()


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        deps: set[str] = set()
        for module, names in _imports(tree):
            deps |= _internal(module, names)
        deps.discard(name)
        graph[name] = deps
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_core_modules_exist() -> None:
    missing = {m for m in CORE if not (GATEWAY / f"{m}.py").exists()
               and not (GATEWAY / m / "__init__.py").exists()}
    assert not missing


@pytest.mark.parametrize("module", sorted(CORE))
def test_protocol_core_imports_no_event_loop(module: str) -> None:
    trees = _modules()
    graph = _graph()
    offenders = []
    for dep in sorted(_closure(graph, module)):
        for imported, _ in _imports(trees[dep]):
            if imported.split(".")[0] in EVENT_LOOPS:
                offenders.append(f"gateway.{dep} imports {imported}")
    assert not offenders, f"gateway.{module} reaches an event loop: {offenders}"


def test_core_modules_only_reach_core_modules() -> None:
    graph = _graph()
    leaks = {m: sorted(graph[m] - CORE) for m in CORE if graph[m] - CORE}
    assert not leaks


def test_gateway_modules_import_each_other_without_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_gateway_module_imports_a_private_name() -> None:
    offenders = []
    for name, tree in _modules().items():
        for module, names in _imports(tree):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    offenders.append(f"gateway.{name}: from {module} import {n}")
    assert not offenders


def test_long_modules_open_with_a_theory_of_operation() -> None:
    long = []
    for path in GATEWAY.rglob("*.py"):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > 600 and "Theory of operation" not in doc:
            long.append(path.name)
    assert not long


def test_nothing_cites_a_file_outside_the_repository() -> None:
    cited = [p.name for p in GATEWAY.rglob("*") if p.is_file() and p.suffix != ".pyc"
             and any(ref in p.read_text(errors="replace") for ref in ("STYLE.md", "DESIGN.md", "/work/"))]
    assert not cited
