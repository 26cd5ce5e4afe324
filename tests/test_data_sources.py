"""Embedded-source building blocks on small synthetic inputs: math compat layer and generator, .po parsing, code
docstring stripping/splitting, wiki markup cleaning, paragraph chunking, stable splits."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bts.core.io import BTSError
from bts.data.sources import EmbeddedConfig, chunk_paragraphs, math_compat, paragraphs, split_of
from bts.data.sources import code as code_src
from bts.data.sources import general as general_src
from bts.data.sources import math as math_src
from bts.data.sources import multilingual as ml_src

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------------------ math compat
def test_compat_rewrites_numpy_and_sympy_constructs():
    src = (
        "import numpy as np\n"
        "from sympy.solvers.diophantine import base_solution_linear as f\n"
        "a = np.zeros((2, 2), dtype=np.object)\n"
        "a.itemset((0, 1), [1, 2])\n"
        "b = np.zeros(3, dtype=np.int64)\n"
        "b.itemset(2, 7)\n"
        "c = np.zeros((2, 3), dtype=np.int64)\n"
        "c.itemset(4, 9)\n"
    )
    code = compile(math_compat.rewrite_source(src), "<t>", "exec")
    ns = {"_bts_itemset": math_compat._bts_itemset}
    exec(code, ns)  # noqa: S102 - the test compiles a fixed snippet
    assert ns["a"].dtype == object and ns["a"][0, 1] == [1, 2] and ns["a"][0, 0] == 0
    assert ns["b"].tolist() == [0, 0, 7]
    assert ns["c"][1, 1] == 9  # a single int is a flat index, as ndarray.itemset had it
    x, y = ns["f"](5, 2, 3)  # a particular solution of 2x + 3y = 5
    assert 2 * x + 3 * y == 5


def _draws(fn, args, n: int = 200, seed: int = 11) -> list[int]:
    import random

    random.seed(seed)
    return [fn(*args) for _ in range(n)]


@pytest.mark.parametrize("fn, shim, args", [
    ("randint", "_bts_randint", (-500.0, 500.0)),  # what numbers.py passes: -10**k / 2, 10**k / 2
    ("randint", "_bts_randint", (np.int64(3), 9.0)),
    ("randrange", "_bts_randrange", (40.0,)),
    ("randrange", "_bts_randrange", (-6.0, 30.0, 3.0)),
])
def test_compat_random_takes_integral_floats_with_the_int_draws(fn, shim, args):
    """Python 3.12 refuses integral floats in randint/randrange; the shim takes them as 3.10-3.11 did and draws
    exactly what the int call draws, so the math problems are the same on every Python version."""
    import random

    as_ints = tuple(int(a) for a in args)
    assert _draws(getattr(math_compat, shim), args) == _draws(getattr(random, fn), as_ints)


@pytest.mark.parametrize("shim, args", [("_bts_randint", (0.5, 4)), ("_bts_randint", (0, 4.5)),
                                        ("_bts_randrange", (2.5,)), ("_bts_randrange", (0, 10, 1.5))])
def test_compat_random_refuses_non_integral_floats_like_3_11(shim, args):
    with pytest.raises(ValueError, match="non-integer"):
        getattr(math_compat, shim)(*args)


def test_compat_rewrites_random_calls_to_the_shims():
    src = "import random\nk = 3\nx = random.randint(-10**k / 2, 10**k / 2)\ny = random.randrange(10**k / 2)\n"
    ns = {"_bts_randint": math_compat._bts_randint, "_bts_randrange": math_compat._bts_randrange}
    import random

    random.seed(5)
    exec(compile(math_compat.rewrite_source(src), "<t>", "exec"), ns)  # noqa: S102 - a fixed snippet
    random.seed(5)
    assert (ns["x"], ns["y"]) == (random.randint(-500, 500), random.randrange(500))


def test_compat_module_generation_each_chosen_module():
    """A few problems from every default module, in-process (the layer patches the package on import)."""
    mods = math_compat.flat_modules("train")
    assert "mathematics_dataset.sample.polynomials" in sys.modules
    loader = sys.modules["mathematics_dataset.sample.polynomials"].__loader__
    assert type(loader).__name__ == "_PatchingLoader"
    for name in EmbeddedConfig().math_modules:
        assert name in mods, name
        math_compat.seed_all(1)
        for _ in range(3):
            p = mods[name]()
            assert str(p.question).strip() and str(p.answer).strip(), name
    # modules that exercise the patched polynomial code (itemset on object arrays, diophantine import)
    math_compat.seed_all(2)
    for name in ("polynomials__expand", "algebra__linear_2d_composed", "polynomials__coefficient_named"):
        assert str(mods[name]().answer)


def test_generate_records_in_process():
    recs = list(math_src.generate(["arithmetic__add_or_sub", "numbers__place_value"], 4, seed=3))
    assert len(recs) == 8
    for r in recs:
        assert r["domain"] == "math" and r["module"] in ("arithmetic__add_or_sub", "numbers__place_value")
        assert r["text"] == f"Question: {r['question']}\nAnswer: {r['answer']}"
        assert len(r["question"]) <= 160 and len(r["answer"]) <= 30
    with pytest.raises(BTSError, match="no_such_module"):
        list(math_src.generate(["no_such_module"], 1))


def _run_generator(out: Path, hashseed: str | None = "0") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("PYTHONHASHSEED", None)
    if hashseed is not None:
        env["PYTHONHASHSEED"] = hashseed
    mods = "algebra__linear_1d,comparison__sort,numbers__list_prime_factors,polynomials__collect,arithmetic__mixed"
    return subprocess.run([sys.executable, "-m", "bts.data.sources.math", "--modules", mods, "--per-module", "6",
                           "--seed", "5", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_math_generator_deterministic_across_processes(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        proc = _run_generator(out)
        assert proc.returncode == 0, proc.stderr
    assert a.read_bytes() == b.read_bytes()
    recs = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(recs) == 30 and {r["module"] for r in recs} >= {"algebra__linear_1d", "comparison__sort"}


def test_math_generator_refuses_without_hashseed(tmp_path):
    proc = _run_generator(tmp_path / "x.jsonl", hashseed=None)
    assert proc.returncode == 2 and "PYTHONHASHSEED=0" in proc.stderr


def test_module_seed_independent_of_other_modules():
    assert math_src.module_seed(0, "a") == math_src.module_seed(0, "a")
    assert math_src.module_seed(0, "a") != math_src.module_seed(1, "a")


# ------------------------------------------------------------------------------------------ multilingual
PO = r'''# test catalog
msgid ""
msgstr ""
"Content-Type: text/plain; charset=UTF-8\n"
"Language: vi\n"

msgid "Save"
msgstr "Lưu"

msgid "Delete %(name)s?"
msgstr "Xóa %(name)s?"

#, fuzzy
msgid "Fuzzy one"
msgstr "Không chắc"

msgid "Untranslated"
msgstr ""

msgid "%(count)s item"
msgid_plural "%(count)s items"
msgstr[0] "%(count)s mục"

msgid "OK"
msgstr "OK"

msgctxt "button"
msgid "Open"
msgstr "Mở"

#~ msgid "Old"
#~ msgstr "Cũ"
'''


def test_po_parsing_skips_empty_fuzzy_plural_and_keeps_placeholders():
    pairs = ml_src.parse_po(PO)
    assert pairs == [("Save", "Lưu"), ("Delete %(name)s?", "Xóa %(name)s?"), ("Open", "Mở")]
    recs = ml_src.po_records("vi", PO, "test.po")
    assert [r["lang"] for r in recs] == ["vi"] * 3
    for r in recs:
        assert r["domain"] == "multilingual" and r["direction"] in ("en-xx", "xx-en")
        assert r["text"] == ml_src.pair_text("vi", r["en"], r["xx"], r["direction"])
        assert f"English: {r['en']}" in r["text"] and f"Vietnamese: {r['xx']}" in r["text"]
    assert ml_src.po_records("vi", PO, "test.po") == recs  # deterministic direction


def test_po_catalog_selection_prefers_pt_br(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for loc in ("pt", "pt_BR", "vi", "de"):
            zf.writestr(f"pkg/locale/{loc}/LC_MESSAGES/django.po", PO)
        zf.writestr("pkg/other/locale/pt/LC_MESSAGES/djangojs.po", PO)
    cats = ml_src.catalogs(whl, ("pt", "vi"))
    assert cats == [("pt", "pkg/locale/pt_BR/LC_MESSAGES/django.po"), ("vi", "pkg/locale/vi/LC_MESSAGES/django.po"),
                    ("pt", "pkg/other/locale/pt/LC_MESSAGES/djangojs.po")]


# ---------------------------------------------------------------------------------------------- code
CODE = '''"""Module docstring."""
import os
X = 1


def f(a, b=2):
    """Docstring of f."""
    # a comment
    return a + b


class C:
    """Only a docstring."""


class D(C):
    """Docstring of D."""

    def m(self):
        """Method doc."""
        return 1

    def n(self):
        if True:
            return "text"
'''


def test_strip_docstrings_and_split_into_defs():
    stripped = code_src.strip_source(CODE)
    assert "docstring" not in stripped.lower() and "Method doc" not in stripped and "comment" not in stripped
    assert 'return "text"' in stripped.replace("'", '"')
    tree = code_src.strip_docstrings(ast.parse(CODE))
    docs = code_src.split_module(tree, min_chars=1, max_chars=10_000)
    assert docs[0].startswith("import os")
    assert any(d.startswith("def f(") for d in docs) and any(d.startswith("class D(C):") for d in docs)
    for d in docs:
        ast.parse(d)
    # a class longer than max_chars is split into valid classes with the same header
    parts = code_src.split_module(code_src.strip_docstrings(ast.parse(CODE)), min_chars=1, max_chars=40)
    d_parts = [p for p in parts if p.startswith("class D(C):")]
    assert len(d_parts) == 2
    for p in parts:
        ast.parse(p)


def test_stdlib_file_selection_skips_tests_and_encodings():
    files = code_src.stdlib_files()
    rels = [f.relative_to(code_src.stdlib_root()).as_posix() for f in files]
    assert "json/decoder.py" in rels and "os.py" in rels
    for r in rels:
        parts = r.split("/")
        assert not {"test", "tests", "encodings", "idle_test", "site-packages", "pydoc_data"} & set(parts), r
        assert not parts[-1].startswith(("_sysconfigdata", "test_")), r
    assert rels == sorted(rels)


# ------------------------------------------------------------------------------------------- general
WIKI = """{{Infobox person|name=Ada}}
'''Ada Lovelace''' (10 December 1815 – 27 November 1852) was an English [[mathematician]] and [[writer|author]].<ref>{{cite web|url=http://x}} A citation</ref> She worked on the [[Analytical Engine]].
<!-- hidden comment -->
[[File:Ada.jpg|thumb|A portrait]]

== Life ==
Her father was [[Lord Byron]]. She was &amp; remains famous.

{| class="wikitable"
| cell || cell
|}

== References ==
* A reference list entry.

[[Category:1815 births]]
[[fr:Ada Lovelace]]
"""


def test_clean_wikitext_removes_markup():
    text = general_src.clean_wikitext(WIKI)
    assert "Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician and author." in text
    assert "Lord Byron" in text and "& remains" in text and "Life" in text
    for junk in ("Infobox", "citation", "hidden", "thumb", "portrait", "cell", "reference list", "Category", "fr:",
                 "[[", "{{", "'''"):
        assert junk not in text, junk


def test_chunk_paragraphs_sizes_and_order():
    paras = [f"p{i} " * (30 + 17 * (i % 5)) for i in range(40)]
    chunks = chunk_paragraphs([p.strip() for p in paras], min_chars=400, max_chars=800)
    assert "\n\n".join(chunks) == "\n\n".join(p.strip() for p in paras)  # nothing lost, order kept
    assert all(len(c) <= 800 + 400 for c in chunks)
    assert all(len(c) >= 200 for c in chunks)
    assert paragraphs("a\n\n \n\nb\nc\n\n") == ["a", "b\nc"]


def test_split_of_is_stable_and_proportional():
    texts = [f"document number {i}" for i in range(20000)]
    splits = [split_of(t) for t in texts]
    assert splits == [split_of(t) for t in texts]
    frac = {s: splits.count(s) / len(texts) for s in ("train", "val", "test")}
    assert abs(frac["val"] - 0.05) < 0.01 and abs(frac["test"] - 0.05) < 0.01
    assert split_of("x", 0.0, 0.0) == "train"
    assert np.isclose(sum(frac.values()), 1.0)


def test_embedded_config_roundtrip_and_errors():
    cfg = EmbeddedConfig.from_dict({"math_per_module": 3, "math_modules": ["arithmetic__mul"]})
    assert cfg.math_per_module == 3 and cfg.math_modules == ("arithmetic__mul",)
    assert EmbeddedConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.domain_params("math")) == {"math_modules", "math_per_module", "math_seed", "val_fraction",
                                              "test_fraction"}
    with pytest.raises(BTSError, match="bogus"):
        EmbeddedConfig.from_dict({"bogus": 1})
