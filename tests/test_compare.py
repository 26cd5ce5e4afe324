"""`bts compare`: differing inputs side by side, metrics judged against the committed CI / seed std / 2 %."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest

from bts.cli import main as cli
from bts.pipeline.compare import compare, error_line, flatten_env

SHA_A, SHA_B = "a" * 64, "b" * 64


def _env(python="3.11.7", code_test=SHA_A, peak=50.0):
    return {
        "format": 1,
        "versions": {"python": python, "torch": "2.13.0+cpu", "tokenizers": "0.23.3"},
        "machine": {"cpu": "AMD EPYC", "cpu_flags": ["avx", "avx2", "avx512f"], "torch_threads": 2,
                    "cpu_capability": "AVX512", "cores_usable": 2},
        "matmul_peak_gflops": peak,
        "matmul_peak": {"gflops": peak, "size": 1024, "threads": 2},
        "data": {"code/test.jsonl": code_test, "general/test.jsonl": SHA_B},
        "tokenizer": {"sha256": SHA_A, "fingerprint": SHA_B},
        "models": {"seed": {"sha256": SHA_A, "weights_sha256": SHA_B, "files": 2}},
        "collect_seconds": 0.4,
    }


def _metrics(env=None, **over) -> dict:
    m = {
        "profile": "tiny",
        "seeds": [0],
        "methods": {
            "seed": {"ppl": {"general": 217.75, "code": 147.28}, "tasks": {"math_mc_acc": 29.6875, "humaneval_pass1": 0.0},
                     "avg": 14.2},
            "bts": {"ppl": {"general": 200.0, "code": 120.0}, "tasks": {"math_mc_acc": 25.0, "humaneval_pass1": 0.0}},
        },
        "ablations": {"bts_k1": {"ppl": {"general": 210.0, "code": 118.9}, "tasks": {"math_mc_acc": 25.0}}},
    }
    if env is not None:
        m["env"] = env
    for path, value in over.items():  # "methods.seed.ppl.general": 226.84
        node = m
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return m


def _write(path, metrics) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return str(path)


@pytest.fixture
def bts_cli():
    """`bts compare ...` through the real dispatcher (bts.cli.commands)."""
    return lambda *argv: cli.main(["compare", *map(str, argv)])


def test_identical_metrics_exit_0(tmp_path, bts_cli, capsys):
    new = _write(tmp_path / "new" / "metrics.json", _metrics(_env()))
    old = _write(tmp_path / "old" / "metrics.json", _metrics(_env(peak=80.0)))
    assert bts_cli(tmp_path / "new", "--against", tmp_path / "old") == 0
    out = capsys.readouterr()
    assert "every metric is identical" in out.out and "recorded inputs are the same" in out.out
    assert out.out.strip().splitlines()[-1].startswith("ok: all 11 metrics inside")
    assert "differing inputs: none" in out.out
    assert "new 50.0 GFLOP/s, old 80.0 GFLOP/s" in out.out  # shown, not compared
    assert out.err == ""
    assert bts_cli(new, "--against", old) == 0  # metrics.json paths work as well


def test_outside_ci_exit_1_with_one_final_line_and_differing_inputs(tmp_path, bts_cli, capsys):
    old = _metrics(_env(), **{"methods.seed.ppl_ci": {"general": [210.0, 225.0], "code": [140.0, 150.0]}})
    new = _metrics(_env(python="3.11.2", code_test=SHA_B), **{"methods.seed.ppl.general": 226.84,
                                                              "methods.seed.ppl.code": 149.0})
    _write(tmp_path / "old" / "metrics.json", old)
    _write(tmp_path / "new" / "metrics.json", new)
    assert bts_cli(tmp_path / "new", "--against", tmp_path / "old") == 1
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == ("error: 1 of 11 metrics outside the committed 95 % CI (largest: seed general ppl 226.84 vs "
                      "217.75 [210.00, 225.00]); differing inputs: Python 3.11.2 vs 3.11.7 (the code corpus splits "
                      "differ with it)")
    # the report: inputs side by side (only those that differ), then the largest differences first
    assert "Inputs that differ (2 of" in out.out
    assert any("versions.python" in ln and "3.11.2" in ln and "3.11.7" in ln for ln in out.out.splitlines())
    assert any("data.code/test.jsonl" in ln and "bbbbbbbbbbbb" in ln and "aaaaaaaaaaaa" in ln
               for ln in out.out.splitlines())
    assert "versions.torch" not in out.out and "matmul" not in out.out.split("Metrics:")[0].replace(
        "fp32 matmul peak", "")
    rows = [ln for ln in out.out.splitlines() if ln.startswith("  seed")]
    assert "general ppl" in rows[0] and "OUTSIDE" in rows[0] and "ci" in rows[0]
    assert "code ppl" in rows[1] and "OUTSIDE" not in rows[1]  # 149 within [140, 150] although +1.2 %


def test_corpus_built_by_another_python_is_named_not_unexplained(tmp_path, bts_cli, capsys):
    """Results made on Python 3.12 against the committed 3.11 ones: the report and the error line name the interpreter
    as the cause of the differing code/general splits (and that NEW's match the 3.12 reference digests)."""
    env312 = _env(python="3.12.1", code_test=SHA_B)
    env312["data"]["general/test.jsonl"] = SHA_A
    env312["data"]["math/test.jsonl"] = env312["data"]["multilingual/test.jsonl"] = SHA_A
    env312["data_reference"] = {"matches": True, "differs": [], "reference_python": "3.12.1",
                                "results_python": "3.11.7", "differs_from_results": ["code/test.jsonl"]}
    env311 = _env()
    env311["data"]["math/test.jsonl"] = env311["data"]["multilingual/test.jsonl"] = SHA_A
    old = _metrics(env311, **{"methods.seed.ppl_ci": {"general": [210.0, 225.0], "code": [140.0, 150.0]}})
    new = _metrics(env312, **{"methods.seed.ppl.general": 226.84})
    _write(tmp_path / "old" / "metrics.json", old)
    _write(tmp_path / "new" / "metrics.json", new)
    assert bts_cli(tmp_path / "new", "--against", tmp_path / "old") == 1
    out = capsys.readouterr()
    assert out.err.strip().endswith("differing inputs: Python 3.12.1 vs 3.11.7 (the code/general corpus splits "
                                    "differ with it)")
    assert ("Corpus: 2 code/general splits differ because the interpreter does (Python 3.12.1 vs 3.11.7): the code "
            "and general domains are built from its standard library; NEW's match the Python 3.12.1 reference "
            "digests.") in out.out


def test_other_inputs_stay_listed_beside_the_interpreter():
    env_new = _env(python="3.12.1", code_test=SHA_B)
    env_new["machine"]["cpu"] = "Intel Xeon"
    res = compare(_metrics(env_new, **{"methods.seed.ppl.general": 300.0}), _metrics(_env()))
    assert error_line(res).endswith("differing inputs: Python 3.12.1 vs 3.11.7 (the code corpus splits differ with "
                                    "it), machine.cpu")
    # a split of a domain that does not come from the standard library is not put down to the interpreter
    env_new["data"]["math/test.jsonl"] = SHA_A
    res = compare(_metrics(env_new, **{"methods.seed.ppl.general": 300.0}), _metrics(_env()))
    assert "data.math/test.jsonl" in error_line(res)


def test_hub_kernels_setting_is_an_input_and_off_when_unrecorded():
    on, off = _env(), _env()
    on["settings"], off["settings"] = {"hub_kernels": True}, {"hub_kernels": False}
    assert compare(_metrics(off), _metrics(_env()))["inputs"]["differs"] == {}  # OLD recorded before the setting
    assert compare(_metrics(on), _metrics(_env()))["inputs"]["differs"] == {"settings.hub_kernels": ["True", "False"]}


def test_seed_std_band_and_std_siblings_not_metrics(tmp_path):
    old = _metrics(**{"methods.seed.ppl": {"general": 203.16, "general_std": 14.15, "code": 138.3, "code_std": 0.1}})
    new = _metrics(**{"methods.seed.ppl": {"general": 226.84, "general_std": 3.0, "code": 138.3, "code_std": 0.1}})
    res = compare(new, old)
    rows = {(r["method"], r["metric"]): r for r in res["metrics"]["rows"]}
    assert ("seed", "general_std") not in rows
    g = rows[("seed", "general")]
    assert g["basis"] == "std" and not g["outside"]  # +11.7 % but within 1.96 x 14.15
    assert g["band"] == pytest.approx([203.16 - 1.959964 * 14.15, 203.16 + 1.959964 * 14.15], rel=1e-6)
    new["methods"]["seed"]["ppl"]["general"] = 203.16 + 2.0 * 14.15
    assert compare(new, old)["metrics"]["outside"] == 1


def test_two_percent_tolerance_without_ci_or_std():
    old = _metrics()
    ok = _metrics(**{"methods.bts.ppl.code": 120.0 * 1.019, "ablations.bts_k1.tasks.math_mc_acc": 25.0 * 0.981})
    bad = _metrics(**{"methods.bts.ppl.code": 120.0 * 1.021})
    assert compare(ok, old)["metrics"]["outside"] == 0
    res = compare(bad, old)
    assert res["metrics"]["outside"] == 1 and res["metrics"]["bases"]["tol"] == 11
    assert error_line(res).startswith("error: 1 of 11 metrics outside the committed 95 % CI (largest: bts code ppl "
                                      "122.52 vs 120.00 [117.60, 122.40]); differing inputs: unknown (")
    # a metric at 0 with no band: any change is outside
    assert compare(_metrics(**{"methods.seed.tasks.humaneval_pass1": 3.0}), old)["metrics"]["outside"] == 1


def test_missing_and_extra_metrics_listed_not_counted():
    old = _metrics()
    new = copy.deepcopy(old)
    del new["ablations"]["bts_k1"]
    new["methods"]["seed"]["tasks"]["new_task"] = 1.0
    res = compare(new, old)
    assert res["metrics"]["total"] == 8 and res["metrics"]["outside"] == 0
    assert "bts_k1 general ppl" in res["metrics"]["missing_in_new"]
    assert res["metrics"]["only_in_new"] == ["seed new_task"]


def test_top_and_json(tmp_path, bts_cli, capsys):
    old = _metrics(_env())
    new = _metrics(_env(), **{"methods.seed.ppl.general": 300.0, "methods.bts.ppl.general": 250.0,
                              "methods.bts.ppl.code": 130.0})
    _write(tmp_path / "o.json", old)
    _write(tmp_path / "n.json", new)
    assert bts_cli(tmp_path / "n.json", "--against", tmp_path / "o.json", "--top", "2", "--json",
                   tmp_path / "cmp.json") == 1
    out = capsys.readouterr().out
    assert sum("OUTSIDE" in ln for ln in out.splitlines()) == 2
    full = json.loads((tmp_path / "cmp.json").read_text())
    assert full["metrics"]["outside"] == 3 and len(full["metrics"]["rows"]) == 11 and full["ok"] is False
    assert full["inputs"]["differs"] == {}
    assert full["metrics"]["rows"][0]["method"] == "seed"  # largest score first (+37.8 %)


def test_flatten_env_skips_measurements():
    flat = flatten_env(_env())
    assert flat["versions.python"] == "3.11.7" and flat["machine.cpu_flags"] == "avx avx2 avx512f"
    assert flat["models.seed.weights_sha256"] == SHA_B
    assert not any(k.startswith(("matmul", "collect", "format", "machine.cores_usable")) for k in flat)


def test_old_without_env(tmp_path):
    res = compare(_metrics(_env(), **{"methods.seed.ppl.general": 300.0}), _metrics())
    assert error_line(res).endswith("differing inputs: unknown (OLD has no env block)")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_default_head(tmp_path, bts_cli, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    results = repo / "results" / "tiny"
    _write(results / "metrics.json", _metrics(_env()))
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "results"], check=True)
    _write(results / "metrics.json", _metrics(_env(python="3.12.1"), **{"methods.seed.ppl.general": 226.84}))
    assert bts_cli(results) == 1  # default: git:HEAD
    out = capsys.readouterr()
    assert "against git:HEAD:results/tiny/metrics.json" in out.out
    assert "largest: seed general ppl 226.84 vs 217.75" in out.err and "versions.python" in out.err
    assert bts_cli(results, "--against", "git:HEAD") == 1
    capsys.readouterr()
    assert bts_cli(results, "--against", "git:no-such-rev") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: git show no-such-rev:results/tiny/metrics.json failed")


def test_bad_input_is_exit_2_one_line(tmp_path, bts_cli, capsys):
    assert bts_cli(tmp_path / "nope", "--against", tmp_path / "nope2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: no such file: {tmp_path / 'nope'}"]
    (tmp_path / "r").mkdir()
    assert bts_cli(tmp_path / "r", "--against", tmp_path) == 2
    assert capsys.readouterr().err.startswith(f"error: no metrics.json at {tmp_path / 'r' / 'metrics.json'}")
    _write(tmp_path / "bad.json", {"x": 1})
    (tmp_path / "notjson.json").write_text("{")
    _write(tmp_path / "good.json", _metrics())
    assert bts_cli(tmp_path / "good.json", "--against", tmp_path / "bad.json") == 2
    assert "not a bts metrics.json" in capsys.readouterr().err
    assert bts_cli(tmp_path / "notjson.json", "--against", tmp_path / "good.json") == 2
    assert "not valid JSON" in capsys.readouterr().err
    # outside any git repository, OLD must be given
    outside = tmp_path / "outside"
    _write(outside / "metrics.json", _metrics())
    rc = bts_cli(outside)
    err = capsys.readouterr().err
    if "not inside a git repository" in err:  # tmp_path may itself lie inside a repository on some machines
        assert rc == 2
    assert bts_cli(tmp_path / "good.json", "--against", tmp_path / "good.json", "--top", "-1") == 2
    assert bts_cli(tmp_path / "good.json", "--bogus") == 2
    assert capsys.readouterr().err.count("\n") == 2
    no_common = {"methods": {"other": {"ppl": {"general": 1.0}}}}
    _write(tmp_path / "other.json", no_common)
    assert bts_cli(tmp_path / "good.json", "--against", tmp_path / "other.json") == 2
    assert "no metric in common" in capsys.readouterr().err
