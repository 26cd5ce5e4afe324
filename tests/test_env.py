"""`bts.pipeline.env.collect_env`: the "env" block of metrics.json (versions, machine, data/tokenizer/model hashes)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from bts.pipeline import env as bts_env
from bts.pipeline.env import collect_env, dir_sha256, env_markdown, matmul_peak


def _fake_cache(root, domains=("code", "general")):
    for d in domains:
        folder = root / "data" / d
        folder.mkdir(parents=True)
        man = {"domain": d, "key": {"params": {"x": 1}},
               "files": {f"{s}.jsonl": {"sha256": f"{d}-{s}".ljust(64, "0"), "bytes": 1} for s in ("train", "val", "test")}}
        (folder / "manifest.json").write_text(json.dumps(man))
    return root


def _model_dir(path, value=0.0, version="5.24.0"):
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), value)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"hidden_size": 4, "transformers_version": version,
                                                  "output_dir": str(path.resolve())}))
    return path


def _tokenizer_dir(path):
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    (path / "tokenizer_config.json").write_text('{"eos_token": "<|eos|>"}')
    (path / "bts_tokenizer.json").write_text(json.dumps({"fingerprint": "f" * 64, "sample_sha256": "s" * 64}))
    return path


def test_collect_env_fields_fast_and_json(tmp_path):
    cache = _fake_cache(tmp_path / "cache")
    models = {"seed": _model_dir(tmp_path / "seed"), "missing": tmp_path / "nope"}
    t = time.perf_counter()
    env = collect_env(models, tokenizer_dir=_tokenizer_dir(tmp_path / "tok"), cache_dir=cache, measure_peak=False)
    assert time.perf_counter() - t < 2.0
    json.dumps(env)  # serialisable as it is
    v = env["versions"]
    assert v["python"].count(".") == 2 and v["torch"] == torch.__version__
    for dist in ("transformers", "lightning", "tokenizers", "numpy", "sympy", "datasets", "mathematics-dataset",
                 "mwparserfromhell", "polib"):
        assert dist in v
    from bts.data.sources.wheels import WHEELS

    assert {f"wheel:{k}" for k in WHEELS} <= set(v) and v["wheel:gensim"] == WHEELS["gensim"].version
    m = env["machine"]
    assert m["torch_threads"] == torch.get_num_threads()
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["cpu_flags"] is None or isinstance(m["cpu_flags"], list)
    assert "blas_info" in m["torch_build"] or m["torch_build"] == {}
    assert env["matmul_peak_gflops"] is None
    assert env["data"] == {f"{d}/{s}.jsonl": f"{d}-{s}".ljust(64, "0") for d in ("code", "general")
                           for s in ("train", "val", "test")}
    assert env["tokenizer"]["fingerprint"] == "f" * 64 and len(env["tokenizer"]["sha256"]) == 64
    assert env["tokenizer"]["files"] == 2  # tokenizer.json + tokenizer_config.json (bts_tokenizer.json: metadata)
    assert len(env["models"]["seed"]["weights_sha256"]) == 64 and env["models"]["missing"] is None


def test_collect_env_never_fails(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no")

    monkeypatch.setattr(bts_env, "machine", boom)
    monkeypatch.setattr(bts_env, "data_digests", boom)
    env = collect_env({"x": tmp_path / "nope"}, tokenizer_dir=tmp_path / "none", cache_dir=tmp_path / "empty",
                      measure_peak=False)
    assert env["machine"] is None and env["data"] is None and env["tokenizer"] is None
    assert env["models"] == {"x": None} and env["versions"]["python"]
    assert "## Environment" in env_markdown(env)


def test_dir_hash_is_content_not_place(tmp_path):
    a = dir_sha256(_model_dir(tmp_path / "a"))
    b = dir_sha256(_model_dir(tmp_path / "elsewhere" / "b", version="5.0.0"))  # other place, other transformers
    assert a == b and a["files"] == 2
    (tmp_path / "a" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    c = dir_sha256(tmp_path / "a")
    assert c["sha256"] != a["sha256"] and c["weights_sha256"] == a["weights_sha256"]
    d = dir_sha256(_model_dir(tmp_path / "d", value=1.0))
    assert d["weights_sha256"] != a["weights_sha256"]
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"abc")
    assert dir_sha256(ckpt)["sha256"] == dir_sha256(ckpt)["weights_sha256"]
    assert dir_sha256(tmp_path / "none") is None


def test_matmul_peak_small():
    peak = matmul_peak(size=64, budget_s=0.01, max_repeats=5)
    assert peak["gflops"] > 0 and peak["size"] == 64 and peak["threads"] == torch.get_num_threads()
    assert 3 <= peak["repeats"] <= 5


def test_collect_env_with_peak_under_budget(tmp_path):
    t = time.perf_counter()
    env = collect_env(cache_dir=tmp_path, measure_peak=True)
    assert time.perf_counter() - t < 5.0  # ~0.6 s of matmuls (more on a loaded machine)
    assert env["matmul_peak_gflops"] > 0 and env["matmul_peak"]["size"] == 1024


def test_env_markdown(tmp_path):
    env = collect_env({"seed": _model_dir(tmp_path / "seed")}, tokenizer_dir=_tokenizer_dir(tmp_path / "tok"),
                      cache_dir=_fake_cache(tmp_path / "cache"), measure_peak=False)
    md = env_markdown(env)
    assert md.startswith("## Environment\n")
    assert f"python {env['versions']['python']}" in md and "gensim" in md
    assert "| code | `code-train00` | `code-val0000` | `code-test000` |" in md
    assert "fingerprint `ffffffffffff`" in md and "seed `" in md
    assert "Not recorded" in env_markdown(None)
    assert not env_markdown(env, heading=False).startswith("#") and "| code |" in env_markdown(env, heading=False)


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/cpuinfo").is_file(), reason="Linux only")
def test_cpu_flags_from_proc():
    info = bts_env._cpuinfo()
    assert info.get("cpu")
    flags = info.get("cpu_flags") or []
    assert set(flags) <= set(bts_env.KERNEL_FLAGS + bts_env.ARM_FLAGS) | {f for f in flags if f.startswith("amx")}


def test_env_records_the_hub_kernels_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("BTS_HUB_KERNELS", raising=False)
    env = collect_env(cache_dir=tmp_path, measure_peak=False)
    assert env["settings"] == {"hub_kernels": False}
    assert "Hub kernels: off (`BTS_HUB_KERNELS`" in env_markdown(env)
    monkeypatch.setenv("BTS_HUB_KERNELS", "1")
    assert collect_env(cache_dir=tmp_path, measure_peak=False)["settings"] == {"hub_kernels": True}
