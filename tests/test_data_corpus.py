"""Corpus cache (splits, manifest, determinism, corruption) with synthetic domain builders, and HF sources."""

from __future__ import annotations

import json
import logging

import pytest

from bts.core.io import BTSError
from bts.data import corpus
from bts.data.corpus import DomainSource, ensure_built, load_split
from bts.data.domains import DOMAINS
from bts.data.sources import EmbeddedConfig, Provenance


def _records(domain: str, n: int = 400) -> list[dict]:
    recs = [{"text": f"{domain} document {i}: " + "lorem ipsum " * (i % 7), "domain": domain, "i": i} for i in range(n)]
    recs.append(dict(recs[3]))  # an exact duplicate: dropped
    return recs


class _FakeMath:
    started = 0.0

    def __init__(self, records):
        self.records = records

    def result(self):
        return self.records

    def close(self):
        pass


@pytest.fixture
def fake_builders(monkeypatch):
    """Replace the four embedded builders by fast synthetic ones; counts calls per domain."""
    from bts.data.sources import code, general, math, multilingual

    calls = {d: 0 for d in DOMAINS}

    def make(domain):
        def build(config, wheel_dir, progress=None):
            calls[domain] += 1
            return _records(domain), Provenance(sources=[{"name": f"fake {domain}"}])

        return build

    monkeypatch.setattr(general, "build", make("general"))
    monkeypatch.setattr(code, "build", make("code"))
    monkeypatch.setattr(multilingual, "build", make("multilingual"))

    def start(config, progress=None, workdir=None):
        calls["math"] += 1
        return _FakeMath(_records("math"))

    monkeypatch.setattr(math, "start", start)
    return calls


def _file_bytes(data_dir):
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_build_is_deterministic_and_splits_disjoint(tmp_path, fake_builders):
    a = ensure_built(tmp_path / "a", progress=False)
    b = ensure_built(tmp_path / "b", progress=False)
    fa, fb = _file_bytes(a), _file_bytes(b)
    assert fa == fb and "code/train.jsonl" in fa and "manifest.json" in fa
    for domain in DOMAINS:
        splits = {s: load_split(domain, s, cache_dir=tmp_path / "a") for s in ("train", "val", "test")}
        texts = {s: {r["text"] for r in recs} for s, recs in splits.items()}
        assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
        assert not texts["val"] & texts["test"]
        assert sum(len(v) for v in texts.values()) == 400  # duplicate dropped
        assert all(len(v) > 0 for v in texts.values())
        assert all(r["domain"] == domain for recs in splits.values() for r in recs)
        man = corpus.manifest(tmp_path / "a", domain)
        assert man["duplicates_dropped"] == 1
        assert man["records"] == {s: len(splits[s]) for s in splits}
        assert man["key"]["params"] == EmbeddedConfig().domain_params(domain)
    index = json.loads((a / "manifest.json").read_text())
    assert set(index["domains"]) == set(DOMAINS)


def test_cached_build_is_reused(tmp_path, fake_builders):
    ensure_built(tmp_path, progress=False)
    assert all(v == 1 for v in fake_builders.values())
    ensure_built(tmp_path, progress=False)
    load_split("code", "val", cache_dir=tmp_path)
    assert all(v == 1 for v in fake_builders.values())
    # other parameters: only the affected domain is rebuilt
    ensure_built(tmp_path, ("math",), config={"math_per_module": 7}, progress=False)
    assert fake_builders["math"] == 2 and fake_builders["code"] == 1


def test_corrupt_file_triggers_rebuild(tmp_path, fake_builders, caplog):
    data = ensure_built(tmp_path, ("multilingual",), progress=False)
    path = data / "multilingual" / "val.jsonl"
    good = path.read_bytes()
    path.write_bytes(good[:-20])
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        recs = load_split("multilingual", "val", cache_dir=tmp_path)
    assert fake_builders["multilingual"] == 2
    assert path.read_bytes() == good and len(recs) == good.count(b"\n")
    assert any("corrupt" in r.message and "multilingual" in r.message for r in caplog.records)
    (data / "multilingual" / "manifest.json").write_text("{not json")
    ensure_built(tmp_path, ("multilingual",), progress=False)
    assert fake_builders["multilingual"] == 3


def test_unknown_domain_and_split_errors(tmp_path):
    with pytest.raises(BTSError, match=r"unknown domain 'poetry'.*general, code, math, multilingual"):
        load_split("poetry", "train", cache_dir=tmp_path)
    with pytest.raises(BTSError, match="poetry"):
        ensure_built(tmp_path, ("code", "poetry"))
    with pytest.raises(BTSError, match="unknown split 'dev2'"):
        load_split("code", "dev2", cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BTS_CACHE_DIR", str(tmp_path / "env"))
    assert corpus.default_cache_dir() == tmp_path / "env"
    assert corpus.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("BTS_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    assert corpus.default_cache_dir() == tmp_path / ".cache" / "bts"


# ------------------------------------------------------------------------------------------ HF sources
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_hf_local_jsonl_source_carved_by_hash(tmp_path):
    rows = [{"content": f"def f{i}():\n    return {i}\n", "meta": i} for i in range(300)] + [{"content": ""}]
    src = {"kind": "hf", "path": "json", "data_files": _write_jsonl(tmp_path / "code.jsonl", rows),
           "text_field": "content"}
    splits = {s: load_split("code", s, cache_dir=tmp_path / "c", source=src) for s in ("train", "val", "test")}
    texts = {s: [r["text"] for r in v] for s, v in splits.items()}
    assert sorted(t for v in texts.values() for t in v) == sorted(r["content"] for r in rows if r["content"])
    assert not set(texts["train"]) & set(texts["val"]) and not set(texts["val"]) & set(texts["test"])
    assert len(texts["val"]) > 0 and len(texts["test"]) > 0
    r = splits["train"][0]
    assert r["domain"] == "code" and set(r) == {"text", "domain", "source"}
    # max_records
    src2 = dict(src, max_records=5)
    assert len(load_split("code", "train", cache_dir=tmp_path / "c", source=src2)) == 5


def test_hf_local_source_with_split_mapping(tmp_path):
    train = _write_jsonl(tmp_path / "tr.jsonl", [{"text": f"train {i}"} for i in range(10)])
    val = _write_jsonl(tmp_path / "va.jsonl", [{"text": f"val {i}"} for i in range(4)])
    src = DomainSource(kind="hf", path="json", data_files={"train": train, "validation": val},
                       split={"train": "train", "val": "validation"})
    assert [r["text"] for r in load_split("math", "val", cache_dir=tmp_path, source=src)] == [
        f"val {i}" for i in range(4)]
    assert len(load_split("math", "train", cache_dir=tmp_path, source=src)) == 10
    with pytest.raises(BTSError, match="no entry for 'test'"):
        load_split("math", "test", cache_dir=tmp_path, source=src)
    bad = DomainSource(kind="hf", path="json", data_files=train, text_field="body")
    with pytest.raises(BTSError, match="no column 'body'"):
        load_split("math", "train", cache_dir=tmp_path, source=bad)


def test_domain_source_coercion_errors():
    assert DomainSource.coerce(None).kind == "embedded"
    assert DomainSource.coerce("hf:org/data").path == "org/data"
    assert DomainSource.coerce({"kind": "hf", "path": "json"}).path == "json"
    with pytest.raises(BTSError, match="colour"):
        DomainSource.coerce({"kind": "hf", "path": "json", "colour": 1})
    with pytest.raises(BTSError, match="needs a path"):
        DomainSource.coerce({"kind": "hf"})
    with pytest.raises(BTSError, match="kind 'ftp'"):
        DomainSource.coerce({"kind": "ftp"})
