"""``code`` domain: the running interpreter's standard-library modules, docstrings stripped.

Files: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except tests (``test``/``tests``/``idle_test``
folders, ``test_*.py``), ``encodings``, ``site-packages``, ``_sysconfigdata*``, ``pydoc_data`` (a 750 KB string
table, used as prose by the general domain) and bundled pip wheels. Each file is parsed with :mod:`ast`, its
module/class/function docstrings are removed (an emptied body gets ``pass``), and the tree is unparsed
(``ast.unparse``: comments and original formatting are dropped; indentation is four spaces).

Documents: the top-level statements of a file, grouped in order. A ``def``/``class`` starts a new document when
the current one already holds at least ``code_min_chars`` characters, so held-out splits contain whole functions
and classes. A class longer than ``code_max_chars`` is split into several documents, each a copy of the class
header followed by a consecutive group of its members. Every document is re-parsed to check that it is valid
Python; a file that fails to parse is skipped and listed in the manifest notes.

The content depends on the interpreter: the manifest records ``sys.version_info`` and a hash over all files.
Licence: Python Software Foundation License.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from . import EmbeddedConfig, Provenance

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "__pycache__",
                       "_bundled", "pydoc_data"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard-library ``.py`` files used by the code (and docstring) sources, in sorted order."""
    root = stdlib_root() if root is None else Path(root)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if (not name.endswith(".py") or name.startswith(("_sysconfigdata", "test_"))
                    or name.endswith("_test.py")):
                continue
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """``(qualified name, raw docstring)`` for the module and every class/function, in source order."""
    out: list[tuple[str, str]] = []

    def visit(node, prefix: str) -> None:
        body = getattr(node, "body", None)
        if isinstance(node, _DOC_OWNERS) and body and _is_docstring(body[0]):
            out.append((prefix, body[0].value.value))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}.{child.name}" if prefix else child.name)

    visit(tree, "")
    return out


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node):
        self.generic_visit(node)
        if node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
        return node

    visit_Module = visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _strip


def strip_docstrings(tree: ast.Module) -> ast.Module:
    """Remove module/class/function docstrings in place (an emptied body becomes ``pass``)."""
    return ast.fix_missing_locations(_StripDocstrings().visit(tree))


def strip_source(source: str) -> str:
    """Source without docstrings, via ``ast.unparse`` (raises ``SyntaxError`` for invalid input)."""
    return ast.unparse(strip_docstrings(ast.parse(source)))


def _class_parts(node: ast.ClassDef, max_chars: int) -> list[str]:
    """Split a long class into copies of its header, each with a consecutive group of members (valid classes)."""
    parts: list[str] = []
    group: list[ast.stmt] = []
    size = 0
    for m in node.body:
        src = ast.unparse(m)
        if group and size + len(src) > max_chars:
            parts.append(_render_class(node, group))
            group, size = [], 0
        group.append(m)
        size += len(src) + 1
    if group:
        parts.append(_render_class(node, group))
    return parts


def _render_class(node: ast.ClassDef, body: list[ast.stmt]) -> str:
    part = copy.copy(node)
    part.body = body
    return ast.unparse(part)


def split_module(tree: ast.Module, min_chars: int = 400, max_chars: int = 6000) -> list[str]:
    """Documents of one (docstring-stripped) module, see the module docstring."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0

    def flush():
        nonlocal cur, size
        if cur:
            docs.append("\n".join(cur))
        cur, size = [], 0

    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            src = ast.unparse(stmt)
            pieces = _class_parts(stmt, max_chars) if len(src) > max_chars else [src]
        else:
            pieces = [ast.unparse(stmt)]
        is_def = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for piece in pieces:
            if cur and (size >= min_chars and is_def or size + len(piece) > max_chars):
                flush()
            cur.append(piece)
            size += len(piece) + 1
    flush()
    return docs


# docstrings per stdlib file, remembered by the code build so that the general build (same process) does not parse
# the standard library a second time: {(relative path, sha256 of the file): [(qualified name, docstring), ...]}
_DOCSTRINGS: dict[tuple[str, str], list[tuple[str, str]]] = {}


def file_docstrings(path: Path, root: Path) -> list[tuple[str, str]] | None:
    """Docstrings of one stdlib file (``None`` if it does not parse), reusing what the code build saw."""
    raw = path.read_bytes()
    key = (path.relative_to(root).as_posix(), hashlib.sha256(raw).hexdigest())
    if key not in _DOCSTRINGS:
        try:
            _DOCSTRINGS[key] = docstrings(ast.parse(raw))
        except (SyntaxError, ValueError):
            return None
    return _DOCSTRINGS[key]


def build(config: EmbeddedConfig, wheel_dir: Path | None = None, progress: bool | None = None):
    """Return ``(records, provenance)`` of the code domain."""
    from tqdm.auto import tqdm

    root = stdlib_root()
    files = stdlib_files(root)
    records: list[dict] = []
    h = hashlib.sha256()
    skipped: list[str] = []
    n_bytes = 0
    for path in tqdm(files, desc="code: stdlib files", unit="file", disable=None if progress is None else not progress):
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        h.update(rel.encode() + b"\0" + raw + b"\0")
        n_bytes += len(raw)
        try:
            tree = ast.parse(raw, filename=rel)
            _DOCSTRINGS[(rel, hashlib.sha256(raw).hexdigest())] = docstrings(tree)
            tree = strip_docstrings(tree)
        except (SyntaxError, ValueError):
            skipped.append(rel)
            continue
        name = module_name(path, root)
        for i, doc in enumerate(split_module(tree, config.code_min_chars, config.code_max_chars)):
            try:
                ast.parse(doc)
            except SyntaxError:  # pragma: no cover - ast.unparse output is valid by construction
                skipped.append(f"{rel}#{i}")
                continue
            records.append({"text": doc, "domain": "code", "module": name, "path": rel, "part": i})
    prov = Provenance(
        sources=[{
            "name": "python-stdlib",
            "root": str(root),
            "python": ".".join(map(str, sys.version_info[:3])),
            "version_info": list(sys.version_info),
            "implementation": sys.implementation.name,
            "files": len(files),
            "bytes": n_bytes,
            "content_sha256": h.hexdigest(),
            "licence": "PSF-2.0",
        }],
        notes=[f"skipped (unparsable): {s}" for s in skipped],
    )
    return records, prov
