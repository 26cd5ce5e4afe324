"""Reference digests of the embedded corpus: the committed file, the one-line warning at build/load time, and
(slow) that this environment's build matches the reference — CI's machine is the reference environment."""

from __future__ import annotations

import copy
import json
import logging
import os
import re

import pytest

from bts.data import corpus, digests
from bts.data.corpus import DOMAINS, ensure_built
from bts.data.sources import EmbeddedConfig, Provenance


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(digests, "_warned", set())


@pytest.fixture
def reference():
    ref = digests.load_reference()
    assert ref is not None, f"{digests.REFERENCE_FILE} missing or unreadable"
    return ref


def _data_dir_like_reference(root, ref, domains=DOMAINS):
    """A data dir whose manifests are what the reference environment built."""
    for d in domains:
        r = ref["domains"][d]
        man = {"domain": d, "key": copy.deepcopy(r["key"]),
               "provenance": {"sources": [{"wheel": w, "sha256": s} for w, s in r.get("wheels", {}).items()]
                              + ([{"name": "python-stdlib", **r["stdlib"]}] if r.get("stdlib") else [])},
               "files": copy.deepcopy(r["files"])}
        (root / d).mkdir(parents=True)
        (root / d / "manifest.json").write_text(json.dumps(man))
    return root


def _edit(root, domain, fn):
    path = root / domain / "manifest.json"
    man = json.loads(path.read_text())
    fn(man)
    path.write_text(json.dumps(man))


def test_reference_file_is_complete(reference):
    assert set(reference["domains"]) == set(DOMAINS)
    made = reference["made_with"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", made["python"]) and made["packages"]["mwparserfromhell"]
    for d, r in reference["domains"].items():
        assert r["key"]["params"] == EmbeddedConfig().domain_params(d), f"{d}: reference not for the defaults"
        assert set(r["files"]) == {"train.jsonl", "val.jsonl", "test.jsonl"}
        assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in r["files"].values())
    assert reference["domains"]["code"]["stdlib"]["content_sha256"]


def test_matching_build_is_silent(tmp_path, reference, caplog):
    data = _data_dir_like_reference(tmp_path, reference)
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        assert digests.check_reference(data) is None
    assert not caplog.records
    res = digests.compare_to_reference(data_dir=data)
    assert res["matches"] and res["checked"] == list(DOMAINS)


def test_other_interpreter_one_warning_line_once(tmp_path, reference, caplog):
    data = _data_dir_like_reference(tmp_path, reference)

    def other_python(man):
        man["key"]["env"]["python"] = "3.11.9"
        man["files"]["test.jsonl"]["sha256"] = "0" * 64

    _edit(data, "code", other_python)
    ref_py = reference["domains"]["code"]["key"]["env"]["python"]
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        line = digests.check_reference(data)
        assert digests.check_reference(data) == line  # same result, but logged once per process
        assert digests.check_reference(data, ("code",)) == line  # also when one domain is loaded after all
        assert digests.check_reference(data, ("math",)) is None
    assert [r.getMessage() for r in caplog.records] == [line]
    assert "\n" not in line
    assert line.startswith("data: code/test.jsonl differs from the reference digests: this interpreter is 3.11.9, "
                           f"the reference {ref_py} (the code domain is the standard library)")
    assert "reference_digests.json" in line


def test_package_builder_wheel_and_stdlib_causes(tmp_path, reference):
    data = _data_dir_like_reference(tmp_path, reference)

    def mw(man):
        man["key"]["env"]["mwparserfromhell"] = "0.6.6"
        man["files"]["train.jsonl"]["sha256"] = "1" * 64

    def builder(man):
        man["key"]["builder_sha256"] = "0" * 16
        man["files"]["val.jsonl"]["sha256"] = "2" * 64

    def wheel(man):
        man["provenance"]["sources"][0]["sha256"] = "3" * 64
        man["files"]["val.jsonl"]["sha256"] = "4" * 64

    def stdlib(man):  # same version, another build (e.g. a distribution's python3)
        for src in man["provenance"]["sources"]:
            if "content_sha256" in src:
                src["content_sha256"], src["root"] = "5" * 64, "/usr/lib/python3.11"
        man["files"]["train.jsonl"]["sha256"] = "6" * 64

    _edit(data, "general", mw)
    _edit(data, "math", builder)
    _edit(data, "multilingual", wheel)
    _edit(data, "code", stdlib)
    res = digests.compare_to_reference(data_dir=data)
    assert res["differs"] == ["general/train.jsonl", "code/train.jsonl", "math/val.jsonl", "multilingual/val.jsonl"]
    by = res["by_domain"]
    assert "mwparserfromhell is 0.6.6 here" in by["general"] and "Wikipedia markup" in by["general"]
    assert "builder code changed" in by["math"] and "python -m bts.data.digests --write" in by["math"]
    assert by["multilingual"].startswith("the wheel Django==")
    assert "standard library at /usr/lib/python3.11 differs" in by["code"]
    line = digests.warning_line(res)
    assert line.count("\n") == 0 and "differ from the reference digests" in line


def test_non_default_parameters_are_not_compared(tmp_path, reference):
    data = _data_dir_like_reference(tmp_path, reference, ("math",))

    def small(man):
        man["key"]["params"]["math_per_module"] = 7
        man["files"]["train.jsonl"]["sha256"] = "7" * 64

    _edit(data, "math", small)
    res = digests.compare_to_reference(data_dir=data)
    assert res["matches"] and res["skipped"] == {"math": "built with non-default parameters"}
    assert digests.check_reference(data) is None


def test_check_never_raises(tmp_path, monkeypatch):
    assert digests.check_reference(tmp_path / "nothing") is None
    monkeypatch.setattr(digests, "compare_to_reference", lambda **k: 1 / 0)
    assert digests.check_reference(tmp_path) is None


def test_ensure_built_runs_the_check(tmp_path, monkeypatch, caplog):
    """The hook: a (fake) default-parameter build that differs from the reference warns once, on build and load."""
    from bts.data.sources import code

    monkeypatch.setattr(code, "build", lambda config, wheel_dir, progress=None: (
        [{"text": f"def f{i}(): pass", "domain": "code"} for i in range(300)], Provenance()))
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        ensure_built(tmp_path, ("code",), progress=False)
        corpus.load_split("code", "test", cache_dir=tmp_path)
    msgs = [r.getMessage() for r in caplog.records if "reference digests" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("data: code/train.jsonl, code/val.jsonl, code/test.jsonl differ")


@pytest.mark.slow
def test_this_environment_matches_the_reference(reference):
    """CI's machine is the reference environment: its build must give the committed digests. A failure names the
    differing splits and the likely cause (interpreter, package, wheel or builder change); after an intended builder
    change regenerate the file with ``python -m bts.data.digests --write``."""
    cache = os.environ.get("BTS_CACHE_DIR") or str(corpus.default_cache_dir())
    data = ensure_built(cache, progress=False)
    res = digests.compare_to_reference(data_dir=data)
    assert res is not None and res["checked"] == list(DOMAINS)
    import platform

    ref_python = reference["made_with"]["python"]
    if platform.python_version() == ref_python:
        assert res["matches"], digests.warning_line(res)
    else:  # another interpreter: the stdlib-built domains may differ, and then the line must say why
        line = digests.warning_line(res) if not res["matches"] else ""
        assert res["matches"] or (platform.python_version() in line and ref_python in line), line
