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


@dataclass(frozen=True)
class Import:
    target: str  # dotted name as imported: a module of ours (resolved, relative imports included) or a third-party one
    line: int
    local: bool  # inside a function
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never runs)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of one module, at any level."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    out: list[Import] = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
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
            out.append(Import(t, node.lineno, _is_local(node, parents), _in_type_checking(node, parents)))
    return out


def scan(modules: dict[str, Path]) -> tuple[list[Edge], dict[str, set[str]]]:
    """Edges between our modules (TYPE_CHECKING imports left out: they never run), and each module's
    third-party imports at module level."""
    edges: list[Edge] = []
    top_external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            if imp.type_checking:
                continue
            if imp.target.split(".")[0] == "bo_search":
                if imp.target != name:
                    edges.append(Edge(name, imp.target, imp.local, imp.line))
            elif not imp.local:
                top_external[name].add(imp.target.split(".")[0])
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


def dynamic_imports(path: Path) -> list[tuple[str, int]]:
    """``importlib.import_module("x")`` and ``__import__("x")`` calls with a literal name: (x, line)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            out.append((node.args[0].value, node.lineno))
    return out


#: the one module that talks to Ray (DESIGN.md: "workers (the only ray importer)")
RAY_IMPORTER = "bo_search.search.workers"


def test_only_the_workers_module_imports_ray(graph) -> None:
    """``bo_search.search.workers`` is the one module that imports ray, at any level (function-local
    and TYPE_CHECKING imports included, and ``importlib.import_module``): the driver, the
    sensitivity passes and the CLIs reach Ray through it. ``bo_search.ray_env`` only sets the
    environment Ray reads when it is imported; it must not import ray itself."""
    modules, _, _ = graph
    bad: list[str] = []
    seen_in_workers = False
    for name, path in modules.items():
        lines = [i.line for i in imports_of(name, path, modules) if i.target.split(".")[0] == "ray"]
        lines += [line for target, line in dynamic_imports(path) if target.split(".")[0] == "ray"]
        if name == RAY_IMPORTER:
            seen_in_workers = bool(lines)
        else:
            bad += [f"{name}:{line}" for line in lines]
    assert seen_in_workers, "the scan no longer sees the workers' own import of ray"
    assert not bad, f"only {RAY_IMPORTER} may import ray: " + "; ".join(bad)


#: the command-line entry points: they wire the package together, nothing below them imports them.
#: ``bo_search.search.runner`` (the searches' wiring) is checked on its own below.
ENTRY_POINTS = {
    "bo_search.acc_modelsize",
    "bo_search.acc_throughput",
    "bo_search.pareto",
    "bo_search.seed",
    "bo_search.evaluate",
    "bo_search.sensitivity.cli",
    "bo_search.sensitivity.__main__",
    "bo_search.report.cli",
    "bo_search.report.__main__",
}


def test_the_search_never_imports_an_entry_point(graph) -> None:
    """No module of ``bo_search/search/`` imports a CLI entry point, at any level (function-local and
    TYPE_CHECKING imports included): the entry points import the search, never the other way."""
    modules, _, _ = graph
    assert ENTRY_POINTS <= set(modules), sorted(ENTRY_POINTS - set(modules))
    # the list keeps up: every module with a top-level main() is an entry point
    mains = {
        name
        for name, path in modules.items()
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text(encoding="utf-8")).body)
    }
    assert mains <= ENTRY_POINTS, f"entry points missing from ENTRY_POINTS: {sorted(mains - ENTRY_POINTS)}"
    search = {m: p for m, p in modules.items() if m.startswith("bo_search.search.")}
    assert {"bo_search.search.driver", "bo_search.search.summary", "bo_search.search.seeding"} <= set(search)
    below_runner = ENTRY_POINTS | {RUNNER}
    bad: list[str] = []
    for name, path in search.items():
        if name == RUNNER:
            continue
        bad += [f"{name}:{i.line} imports {i.target}" for i in imports_of(name, path, modules) if i.target in below_runner]
        bad += [f"{name}:{line} imports {target}" for target, line in dynamic_imports(path) if target in below_runner]
    assert not bad, "the search imports an entry point or the runner: " + "; ".join(bad)


#: the searches' wiring (flags -> setup -> workers, driver, summary): only entry points import it
RUNNER = "bo_search.search.runner"


def test_entry_points_do_not_import_each_other(graph) -> None:
    """An entry point takes what it shares with another from the layers below (``structure``, the
    search's modules), never from the other entry point (issue 32: seed.py took its size limit from
    acc_modelsize and its structure from sensitivity.cli)."""
    modules, _, _ = graph
    own = {"bo_search.sensitivity.__main__": "bo_search.sensitivity.cli", "bo_search.report.__main__": "bo_search.report.cli"}
    bad: list[str] = []
    for name in ENTRY_POINTS:
        for i in imports_of(name, modules[name], modules):
            if i.target in ENTRY_POINTS and i.target != own.get(name):
                bad.append(f"{name}:{i.line} imports {i.target}")
    assert not bad, "entry points import each other: " + "; ".join(sorted(bad))
