"""The package's import graph, read from the source (function-local imports included): acyclic, the
core never imports search, sensitivity or report, and a function-local import of our own modules is
there only to keep a heavy dependency (torch, ax, ray, matplotlib, ...) out of ``--help`` and out of
the error path."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "bo_search"
PACKAGES = ("search", "sensitivity", "report")
#: third-party modules slow to import (seconds for torch, ax, ray) or absent from a minimal install
HEAVY = {
    "torch",
    "transformers",
    "ax",
    "botorch",
    "ray",
    "matplotlib",
    "lm_eval",
    "torchao",
    "scipy",
    "numpy",
    "gguf",
    "safetensors",
    "gensim",
    "datasets",
    "filelock",
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    local: bool  # inside a function (imported when called, not when the module is)
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _is_local(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def scan(modules: dict[str, Path]) -> tuple[list[Edge], dict[str, set[str]]]:
    """Edges between our modules (TYPE_CHECKING imports left out: they never run), and each module's
    third-party imports at module level."""
    edges: list[Edge] = []
    top_external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _in_type_checking(node, parents):
                continue
            local = _is_local(node, parents)
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t.split(".")[0] == "bo_search":
                    while t not in modules and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t != name:
                        edges.append(Edge(name, t, local, node.lineno))
                elif not local:
                    top_external[name].add(t.split(".")[0])
    return edges, top_external


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge], dict[str, set[str]]]:
    modules = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    edges, ext = scan(modules)
    return modules, edges, ext


def test_scan_sees_both_kinds_of_import(graph) -> None:
    modules, edges, _ = graph
    assert {"bo_search.search.runner", "bo_search.sensitivity.table", "bo_search.report.cli", "bo_search.metrics"} <= set(modules)
    pairs = {(e.src, e.dst, e.local) for e in edges}
    assert ("bo_search.search.runner", "bo_search.search.history", False) in pairs  # module level
    assert ("bo_search.search.runner", "bo_search.search.workers", True) in pairs  # function-local (ray)


def test_import_graph_is_acyclic(graph) -> None:
    modules, edges, _ = graph
    out: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        out[e.src].add(e.dst)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(out[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_core_never_imports_search_sensitivity_or_report(graph) -> None:
    modules, edges, _ = graph
    upper = tuple(f"bo_search.{p}" for p in PACKAGES)
    entry = {"bo_search.acc_modelsize", "bo_search.acc_throughput", "bo_search.pareto", "bo_search.seed", "bo_search.export"}
    core = {m for m in modules if not m.startswith(upper) and m not in entry and m != "bo_search"}
    assert {"bo_search.types", "bo_search.quant", "bo_search.trial", "bo_search.metrics", "bo_search.structure"} <= core
    bad = [f"{e.src}:{e.line} imports {e.dst}" for e in edges if e.src in core and e.dst.startswith(upper)]
    assert not bad, bad


def test_local_imports_only_defer_heavy_modules(graph) -> None:
    """A function-local import of one of our modules must defer something heavy: the module (or one it
    imports at module level) imports torch, ax, ray, matplotlib, ... at module level."""
    modules, edges, ext = graph
    top: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if not e.local:
            top[e.src].add(e.dst)

    def heavy(m: str, seen: set[str]) -> bool:
        if ext[m] & HEAVY:
            return True
        seen.add(m)
        return any(heavy(d, seen) for d in top[m] if d not in seen)

    light = sorted({f"{e.src}:{e.line} imports {e.dst}" for e in edges if e.local and not heavy(e.dst, set())})
    assert not light, "function-local imports of light modules (import them at module level): " + "; ".join(light)


#: llama.cpp's Python bindings (and the FFI they are written in): only the adapter may import them
LLAMACPP_PACKAGES = {"llama_cpp_py_sync", "llama_cpp", "cffi"}
LLAMACPP_ADAPTER = "bo_search.llamacpp"


def test_only_the_llamacpp_adapter_talks_to_llamacpp(graph) -> None:
    """``bo_search.llamacpp`` is the one module that imports llama.cpp's bindings, at any level
    (function-local imports included); everything else goes through it."""
    modules, _, _ = graph
    bad: list[str] = []
    seen_in_adapter = False
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            if any(t.split(".")[0] in LLAMACPP_PACKAGES for t in targets):
                if name == LLAMACPP_ADAPTER:
                    seen_in_adapter = True
                else:
                    bad.append(f"{name}:{node.lineno}")
    assert seen_in_adapter, "the scan no longer sees the adapter's own import of the bindings"
    assert not bad, "only bo_search.llamacpp may import llama.cpp's bindings: " + "; ".join(bad)
