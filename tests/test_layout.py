"""The house's layout rules (docs/design.md, "Layout"), read from the source: no import cycle between modules
(function-level imports included), arrows only downwards between layers, no file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("bts", "baselines")
MAX_LINES = 500

# layer -> module prefixes it must never import (the model layers never import evaluation or the pipeline; core
# imports nothing else of the project; nothing in bts imports the baselines)
FORBIDDEN = {
    "bts.core": ("bts.", "baselines"),
    "bts.training": ("bts.eval", "bts.pipeline", "bts.cli", "bts.stitch", "bts.dense", "bts.data", "baselines"),
    "bts.dense": ("bts.eval", "bts.pipeline", "bts.cli", "bts.stitch", "baselines"),
    "bts.stitch": ("bts.eval", "bts.pipeline", "bts.cli", "baselines"),
    "bts.data": ("bts.eval", "bts.pipeline", "bts.cli", "bts.stitch", "bts.dense", "bts.training", "baselines"),
    "bts.eval": ("bts.pipeline", "bts.cli", "baselines"),
    "bts": ("baselines",),
    "baselines": ("bts.eval", "bts.pipeline", "bts.cli"),
}
ALLOWED_WITHIN = {"bts.core": ("bts.core",)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((SRC / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def add(target: str) -> None:
        # the deepest project module named by the import (``from a.b import c`` may name module a.b.c)
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    modules = set(files)
    return {name: imports_of(name, path, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(name: str) -> str:
    """The most specific layer of FORBIDDEN that ``name`` belongs to."""
    best = ""
    for layer in FORBIDDEN:
        if (name == layer or name.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for name, targets in sorted(graph.items()):
        layer = layer_of(name)
        if not layer:
            continue
        for t in sorted(targets):
            if any(t == p or t.startswith(p) for p in FORBIDDEN[layer]) and not any(
                    t == a or t.startswith(a + ".") for a in ALLOWED_WITHIN.get(layer, ())):
                out.append(f"{name} imports {t}")
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    # the detector itself, on a graph with a 3-cycle hidden behind an acyclic part
    graph = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}, "e": set()}
    assert cycles(graph) == [["b", "c", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_count(tmp_path):
    # an import inside a function is an edge like any other: a cycle cannot hide there
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "x.py").write_text("import p.y\n")
    (pkg / "y.py").write_text("def f():\n    from p import x\n    return x\n")
    modules = {"p", "p.x", "p.y"}
    assert imports_of("p.y", pkg / "y.py", modules) == {"p.x"}
    assert imports_of("p.x", pkg / "x.py", modules) == {"p.y"}


def test_layers_point_downwards():
    assert violations(import_graph()) == []


def test_a_layer_violation_is_reported():
    graph = {"bts.stitch.model": {"bts.eval.suite", "bts.core.io"}, "bts.core.io": {"bts.data.corpus"}}
    assert violations(graph) == ["bts.core.io imports bts.data.corpus", "bts.stitch.model imports bts.eval.suite"]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_file_over_500_lines(pkg):
    long = {str(p.relative_to(SRC)): n for p in (SRC / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
