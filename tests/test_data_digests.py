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
from bts.data.corpus import ensure_built
from bts.data.domains import DOMAINS
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


def test_reference_file_is_complete():
    refs = digests.load_references()
    assert refs is not None and refs["results_python"] == "3.11"
    assert {"3.10", "3.11", "3.12", "3.13"} <= set(refs["by_python"])
    for minor, reference in refs["by_python"].items():
        made = reference["made_with"]
        assert re.fullmatch(r"\d+\.\d+\.\d+", made["python"]) and digests.python_minor(made["python"]) == minor
        assert made["packages"]["mwparserfromhell"]
        assert set(reference["domains"]) == set(DOMAINS)
        for d, r in reference["domains"].items():
            assert r["key"]["params"] == EmbeddedConfig().domain_params(d), f"{minor}/{d}: not for the defaults"
            assert set(r["files"]) == {"train.jsonl", "val.jsonl", "test.jsonl"}
            assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) for f in r["files"].values())
        assert reference["domains"]["code"]["stdlib"]["content_sha256"]
    # the math and multilingual splits are the same on every supported version (math_compat); code/general are not
    by = refs["by_python"]
    for d in ("math", "multilingual"):
        assert len({json.dumps(r["domains"][d]["files"], sort_keys=True) for r in by.values()}) == 1, d
    assert by["3.12"]["domains"]["code"]["files"] != by["3.11"]["domains"]["code"]["files"]


def test_a_format_1_file_is_read_as_one_version(tmp_path, reference):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"format": 1, "about": "", **reference}))
    refs = digests.load_references(path)
    assert refs["results_python"] == "3.11" and list(refs["by_python"]) == ["3.11"]
    assert digests.load_reference(path) == digests.load_reference(path, "3.11") == {"format": 1, "about": "",
                                                                                     **reference}
    assert digests.load_reference(path, "3.12") is None


def test_write_keeps_the_other_versions_entries(reference):
    refs = digests.load_references()
    entry = copy.deepcopy(reference)
    entry["made_with"]["python"] = "3.14.2"
    out = digests.with_entry(entry, refs)
    assert out["results_python"] == "3.11" and list(out["by_python"])[-1] == "3.14"
    assert {k: v for k, v in out["by_python"].items() if k != "3.14"} == refs["by_python"]
    assert digests.with_entry(entry, None)["results_python"] == "3.14"


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
    assert "builder code changed" in by["math"] and "bts data --write-digests" in by["math"]
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


def _as_built_by(data, version: str, like: dict) -> None:
    """Make the manifests in ``data`` say they were built by Python ``version`` with ``like``'s digests."""
    for d in DOMAINS:
        def edit(man, d=d):
            if "python" in man["key"]["env"]:
                man["key"]["env"]["python"] = version if d != "math" else digests.python_minor(version)
            man["files"] = copy.deepcopy(like["domains"][d]["files"])
        _edit(data, d, edit)


def test_another_supported_version_says_plainly_what_it_builds(tmp_path, reference, caplog):
    """Built on 3.12 and matching the 3.12 reference: one line that names the version and the domains it changes,
    not a hint at corruption."""
    data = _data_dir_like_reference(tmp_path, reference)
    ref312 = digests.load_reference(python="3.12")
    _as_built_by(data, ref312["made_with"]["python"], ref312)
    res = digests.compare_to_reference(data_dir=data)
    assert res["matches"] and res["reference_python"] == ref312["made_with"]["python"]
    assert res["results_python"] == reference["made_with"]["python"]
    assert sorted({k.split("/")[0] for k in res["differs_from_results"]}) == ["code", "general"]
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        line = digests.check_reference(data)
        digests.check_reference(data, ("code",))
    assert [r.getMessage() for r in caplog.records] == [line]
    assert line.startswith("data: Python 3.12 builds other general/code splits than the 3.11 reference (")
    assert "they match the Python 3.12 reference digests" in line and "\n" not in line
    assert "differ from the reference" not in line and "corrupt" not in line
    assert digests.check_reference(data, ("math", "multilingual")) is None  # the same on every version


def test_another_patch_release_is_compared_with_its_minor_versions_reference(tmp_path, reference):
    data = _data_dir_like_reference(tmp_path, reference)
    ref312 = digests.load_reference(python="3.12")
    _as_built_by(data, "3.12.3", ref312)
    _edit(data, "code", lambda man: man["files"]["train.jsonl"].update(sha256="8" * 64))
    line = digests.warning_line(digests.compare_to_reference(data_dir=data))
    assert line.startswith(f"data: code/train.jsonl differs from the reference digests: this interpreter is 3.12.3, "
                           f"the reference {ref312['made_with']['python']} (the code domain is the standard library)")


def test_a_version_without_reference_says_so(tmp_path, reference):
    data = _data_dir_like_reference(tmp_path, reference)
    _as_built_by(data, "3.14.0", reference)
    _edit(data, "code", lambda man: man["files"]["test.jsonl"].update(sha256="9" * 64))
    res = digests.compare_to_reference(data_dir=data)
    assert res["differs"] == res["differs_from_results"] == ["code/test.jsonl"]
    assert res["cause"].startswith("there are no reference digests for Python 3.14 (only for 3.10, 3.11, 3.12, "
                                   "3.13); this interpreter is 3.14.0, the reference 3.11.7")


@pytest.mark.slow
def test_this_environment_matches_the_reference():
    """CI's machines build what the reference of their Python minor version says: a failure names the differing
    splits and the likely cause (interpreter, package, wheel or builder change); after an intended builder change
    regenerate the entry with ``bts data --write-digests`` under each supported version."""
    cache = os.environ.get("BTS_CACHE_DIR") or str(corpus.default_cache_dir())
    data = ensure_built(cache, progress=False)
    res = digests.compare_to_reference(data_dir=data)
    assert res is not None and res["checked"] == list(DOMAINS)
    import platform

    own = digests.load_reference(python=digests.python_minor())
    if own is not None and platform.python_version() == own["made_with"]["python"]:
        assert res["matches"], digests.warning_line(res)
    else:  # another interpreter: the stdlib-built domains may differ, and then the line must say why
        line = digests.warning_line(res) or ""
        assert res["matches"] or platform.python_version() in line, line
