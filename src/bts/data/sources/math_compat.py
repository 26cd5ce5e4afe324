"""Compatibility layer that makes ``mathematics-dataset==1.0.1`` (DeepMind, 2019) run on numpy 2 / sympy 1.14.

The package is unmaintained and fails to import or run on current libraries. Rather than vendoring a fork, its
modules are loaded through an import hook that rewrites a few constructs in the *source* (AST level) before it is
compiled, plus two small function replacements that make the output independent of object identities:

Source rewrites (every ``mathematics_dataset.*`` module):

1. ``from sympy.solvers.diophantine import base_solution_linear`` — the function moved to
   ``sympy.solvers.diophantine.diophantine`` (sympy >= 1.7); the import is redirected there.
2. ``np.object`` / ``np.int`` / ``np.float`` / ``np.bool`` / ``np.complex`` / ``np.str`` (aliases removed in
   numpy 1.24) become the Python builtins they aliased.
3. ``arr.itemset(index, value)`` (removed in numpy 2.0) becomes ``_bts_itemset(arr, index, value)``, which stores
   ``value`` as one element (also a list into an object array, as ``itemset`` did).
4. ``random.randint`` / ``random.randrange`` become ``_bts_randint`` / ``_bts_randrange``, which accept integral
   floats as Python 3.10-3.11 did (3.12 removed that: ``numbers.py`` passes ``-10**k / 2``) and then call the
   same ``random`` functions with ints: the draws, and so the problems, equal 3.11's on every Python version.

Determinism patches (``mathematics_dataset.util.composition``):

5. ``Context.pop`` chose a fresh symbol with ``random.choice(list(a_set_of_str))``: the result depended on string
   hashing (``PYTHONHASHSEED``). It now chooses from ``sorted(...)``.
6. ``expand_entities`` de-duplicated ``Entity`` objects through a ``set`` (ordered by ``id()``, i.e. by memory
   address) before shuffling them: it now de-duplicates in first-seen order.

Remaining hash-order dependence (e.g. sets of sympy expressions inside sympy itself) is removed by running the
generator with ``PYTHONHASHSEED=0`` (see :mod:`bts.data.sources.math`), with ``random``, ``numpy`` and sympy's own
RNG (``sympy.core.random``) seeded. Call :func:`install` before importing ``mathematics_dataset`` (idempotent;
an unpatched copy already in ``sys.modules`` is dropped so that it is re-imported through the patching loader).
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.util
import operator
import random
import sys
import warnings
from typing import Any

PACKAGE = "mathematics_dataset"
PINNED_VERSION = "1.0.1"

_NUMPY_ALIASES = {"object": "object", "int": "int", "float": "float", "bool": "bool", "complex": "complex",
                  "str": "str"}
_DIOPHANTINE_OLD = "sympy.solvers.diophantine"
_DIOPHANTINE_NEW = "sympy.solvers.diophantine.diophantine"

PATCHES = (
    "import: sympy.solvers.diophantine.base_solution_linear -> sympy.solvers.diophantine.diophantine",
    "numpy: np.object/np.int/np.float/np.bool/np.complex/np.str -> builtins",
    "numpy: ndarray.itemset(index, value) -> element assignment",
    "python 3.12: random.randint/randrange accept integral floats (as 3.10-3.11 did)",
    "determinism: composition.Context.pop chooses from sorted(symbols)",
    "determinism: composition.expand_entities de-duplicates entities in first-seen order",
)


# ------------------------------------------------------------------------------------------------ rewrites
def _bts_itemset(arr, *args):
    """Replacement for the removed ``ndarray.itemset(*args)``: the last argument is the value."""
    import numpy as np

    if not args:
        raise TypeError("itemset must have at least one argument")
    *index, value = args
    if len(index) == 1 and isinstance(index[0], tuple):
        idx: Any = index[0]
    elif len(index) == 1 and arr.ndim != 1:  # a single int is a flat index, as in itemset
        idx = np.unravel_index(int(index[0]), arr.shape)
    else:
        idx = tuple(index)
    if arr.dtype == object:
        # assigning a sequence to one element of an object array stores the sequence itself
        arr[idx] = None
    arr[idx] = value


def _as_index(value, position: int):
    """An argument of ``randrange`` as Python 3.10-3.11 took it: an int, or a float equal to an int."""
    try:
        return operator.index(value)
    except TypeError:
        as_int = int(value)
        if as_int != value:
            raise ValueError(f"non-integer arg {position} for randrange()") from None
        return as_int


def _bts_randint(a, b):
    """``random.randint`` accepting integral floats (Python <= 3.11 semantics, same draws)."""
    return random.randint(_as_index(a, 1), _as_index(b, 2))


def _bts_randrange(start, stop=None, step=1):
    """``random.randrange`` accepting integral floats (Python <= 3.11 semantics, same draws)."""
    stop = None if stop is None else _as_index(stop, 2)
    return random.randrange(_as_index(start, 1), stop, _as_index(step, 3))


_RANDOM_SHIMS = {"randint": "_bts_randint", "randrange": "_bts_randrange"}


class _Rewriter(ast.NodeTransformer):
    def __init__(self) -> None:
        self.changes = 0

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.module == _DIOPHANTINE_OLD and any(a.name == "base_solution_linear" for a in node.names):
            node.module = _DIOPHANTINE_NEW
            self.changes += 1
        return node

    def visit_Attribute(self, node: ast.Attribute):
        self.generic_visit(node)
        if (isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")
                and node.attr in _NUMPY_ALIASES and isinstance(node.ctx, ast.Load)):
            self.changes += 1
            return ast.copy_location(ast.Name(id=_NUMPY_ALIASES[node.attr], ctx=ast.Load()), node)
        return node

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "itemset" and not node.keywords:
            self.changes += 1
            return ast.copy_location(
                ast.Call(func=ast.Name(id="_bts_itemset", ctx=ast.Load()), args=[node.func.value, *node.args],
                         keywords=[]),
                node,
            )
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "random"
                and func.attr in _RANDOM_SHIMS):
            self.changes += 1
            return ast.copy_location(
                ast.Call(func=ast.Name(id=_RANDOM_SHIMS[func.attr], ctx=ast.Load()), args=node.args,
                         keywords=node.keywords),
                node,
            )
        return node


def rewrite_source(source: str | bytes, filename: str = "<string>") -> ast.Module:
    """Return the patched AST of one module's source (exposed for tests)."""
    tree = ast.parse(source, filename=filename)
    tree = _Rewriter().visit(tree)
    return ast.fix_missing_locations(tree)


class _PatchingLoader(importlib.machinery.SourceFileLoader):
    """Compiles from the rewritten source; never reads or writes bytecode caches (they hold unpatched code)."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        source = self.get_data(path)
        return compile(rewrite_source(source, path), path, "exec", dont_inherit=True)

    def exec_module(self, module):
        module.__dict__.update(_bts_itemset=_bts_itemset, _bts_randint=_bts_randint, _bts_randrange=_bts_randrange)
        super().exec_module(module)
        post = _POST_IMPORT.get(module.__name__)
        if post is not None:
            post(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _PatchingLoader(fullname, spec.origin)
        return spec


# ------------------------------------------------------------------------------------ determinism patches
def _patch_composition(mod) -> None:
    Context = mod.Context

    def pop(self):
        """Returns an unused symbol (and keeps track of it being used). [bts: sorted choice]"""
        allowed = (mod._ALLOWED_SYMBOLS
                   .difference(self._relation_symbols)
                   .difference(self._self_symbols)
                   .difference(self._child_symbols))
        if not allowed:
            raise ValueError("Ran out of symbols")
        symbol = random.choice(sorted(allowed))
        self._self_symbols.add(symbol)
        return symbol

    def expand_entities(context, **kwargs):
        """Returns prefix description and updated `**kwargs`. [bts: entity order independent of id()]"""
        kwargs = kwargs.copy()
        entities = dict.fromkeys(context.child_entities)
        for key, maybe_entity in kwargs.items():
            if isinstance(maybe_entity, mod.Entity):
                entities[maybe_entity] = None
                kwargs[key] = maybe_entity.handle
        entities = list(entities)
        random.shuffle(entities)
        child_descriptions = []
        for entity in entities:
            child_descriptions.append(entity.child_description)
            if not entity.expression_used:
                child_descriptions.append(entity.description)
        child_description = " ".join([s for s in child_descriptions if s])
        return child_description, kwargs

    Context.pop = pop
    mod.expand_entities = expand_entities


_POST_IMPORT = {PACKAGE + ".util.composition": _patch_composition}
_FINDER = _PatchingFinder()


def install() -> None:
    """Install the import hook (idempotent). Must run before ``mathematics_dataset`` is first imported."""
    if _FINDER in sys.meta_path:
        return
    # an unpatched copy imported earlier cannot have got past its own imports (they fail on numpy 2 / sympy
    # 1.14) — drop it so that the next import goes through the patching loader
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        if not isinstance(getattr(sys.modules[name], "__loader__", None), _PatchingLoader):
            del sys.modules[name]
    sys.meta_path.insert(0, _FINDER)


def seed_all(seed: int) -> None:
    """Seed every RNG that mathematics_dataset draws from: ``random``, numpy's global RNG and sympy's RNG."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        from sympy.core import random as sympy_random

        sympy_random.seed(seed)
    except ImportError:  # pragma: no cover - old sympy
        pass


def flat_modules(regime: str = "train") -> dict[str, Any]:
    """``{"<area>__<name>": callable() -> Problem}`` for one regime (``train`` = all difficulties, ``interpolate``,
    ``extrapolate``), with the compatibility layer installed. Sorted by name."""
    install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mathematics_dataset.modules import modules

    if regime == "train":
        tree = modules.train(lambda range_: range_)  # the full entropy range, as generate.py's --train_split=False
    elif regime == "interpolate":
        tree = modules.test()
    elif regime == "extrapolate":
        tree = modules.test_extra()
    else:
        from bts.core.io import BTSError

        raise BTSError(f"unknown mathematics_dataset regime {regime!r} (train, interpolate, extrapolate)")
    out: dict[str, Any] = {}

    def add(d, prefix=None):
        for key, value in d.items():
            name = f"{prefix}__{key}" if prefix else key
            if isinstance(value, dict):
                add(value, name)
            else:
                out[name] = value

    add(tree)
    return dict(sorted(out.items()))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mathematics-dataset")
    except PackageNotFoundError:  # pragma: no cover
        return "missing"
