"""Reliability (issue 6): integrity of stitch checkpoints, atomic outputs and cache rebuilds, resuming after a
SIGKILL, numerical faults, safe loading, and concurrent runs."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_fit as tf
from bts.cli.main import main as bts_main
from bts.core.io import BTSError, atomic_dir, atomic_path, atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def fit_env(tmp_path_factory):
    """Tiny corpus (two JSONL domains), tokenizer, and a seed + two experts as HF directories (vocab = tokenizer)."""
    root = tmp_path_factory.mktemp("fit")
    sources = tf.write_corpus(root / "corpus")
    tok = tf.write_tokenizer(root / "tok")
    vocab = len(tok)
    hub = tf.save_llama(root / "seed", 0, vocab)
    code = tf.save_llama(root / "code", 0, vocab, noise=0.02)
    math = tf.save_llama(root / "math", 1, vocab, noise=0.02)
    return {"root": root, "sources": sources, "tok": root / "tok", "vocab": vocab, "hub": hub, "code": code,
            "math": math}


def _stitch_model(env, out: Path, **kw) -> dict:
    init = {"hub": str(env["hub"]), "hub_name": "seed", "experts": [str(env["code"]), str(env["math"])],
            "expert_names": ["code", "math"], "stitch": {"num_stitch_layers": 2, "gate_dropout": 0.1},
            "lr": 5e-3, "warmup_steps": 2, "output_dir": str(out)}
    init.update(kw)
    return {"class_path": "bts.stitch.module.StitchModule", "init_args": init}


# ---------------------------------------------------------------------------------------------------- integrity
def test_expert_changed_by_one_ulp_is_refused_and_override_recorded(tmp_path, fit_env, monkeypatch):
    from bts.dense.modeling import load_causal_lm
    from bts.eval.loading import changed_models_entry, load_for_eval
    from bts.stitch.checkpoint import MANIFEST, load_stitched, save_stitched
    from bts.stitch.model import StitchedLM

    code_dir, math_dir = tmp_path / "code", tmp_path / "math"
    load_causal_lm(fit_env["code"]).save_pretrained(code_dir)
    load_causal_lm(fit_env["math"]).save_pretrained(math_dir)
    model = StitchedLM.from_pretrained_dirs(fit_env["hub"], [code_dir, math_dir], expert_names=["code", "math"],
                                            num_stitch_layers=2)
    ckpt = save_stitched(model, tmp_path / "bts")
    # one weight of the math expert moves by exactly one ulp
    m = load_causal_lm(math_dir)
    w = m.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = w[3, 5].clone()
        w[3, 5] = torch.nextafter(old, torch.tensor(float("inf")))
    assert w[3, 5] != old and (w[3, 5] - old).abs() < 1e-6
    m.save_pretrained(math_dir)

    with pytest.raises(BTSError) as err:
        load_stitched(ckpt)
    msg = str(err.value)
    assert "'math'" in msg and "'code'" not in msg and "changed" in msg and "\n" not in msg

    loaded = load_stitched(ckpt, allow_changed_models=True)
    assert loaded.allow_changed_models is True and loaded.changed_models == ["math"]
    assert changed_models_entry(loaded) == {"changed_models": ["math"]}
    # the evaluation loader refuses by default and records the override when it is given
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).write_bytes((fit_env["tok"] / name).read_bytes())
    with pytest.raises(BTSError, match="'math'"):
        load_for_eval(ckpt)
    model2, _, _ = load_for_eval(ckpt, allow_changed_models=True)
    assert changed_models_entry(model2) == {"changed_models": ["math"]}
    # re-saving records the override and the changed model in the manifest
    save_stitched(loaded, tmp_path / "resaved")
    manifest = json.loads((tmp_path / "resaved" / MANIFEST).read_text())
    assert manifest["allow_changed_models"] is True and manifest["trained_with_changed_models"] == ["math"]
    # the reproduction refuses too, and with --allow-changed-models its metrics entry carries the flag
    from bts.eval import suite
    from bts.pipeline.profile import Profile, StageSpec
    from bts.pipeline.run import Pipeline

    monkeypatch.setattr(suite, "evaluate", lambda *a, **k: {"ppl": {}, "tasks": {}, "avg": 0.0})
    profile = Profile(profile="t", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"), stages=[])
    stage = StageSpec(name="bts", kind="fit", family="bts")
    strict = Pipeline(profile, 0, progress=False)
    strict.hashes["bts"] = "h"
    with pytest.raises(BTSError, match="'math'"):
        strict.evaluate_stage(stage, ckpt)
    lenient = Pipeline(profile, 0, progress=False, allow_changed_models=True)
    lenient.hashes["bts"] = "h"
    assert lenient.evaluate_stage(stage, ckpt)["changed_models"] == ["math"]


# ------------------------------------------------------------------------------------------------------- resume
PAUSE_CALLBACK = '''
import pathlib, time
import lightning as L


class PauseAt(L.Callback):
    """Writes ``marker`` and sleeps once ``global_step`` reaches ``step`` (the test then SIGKILLs the process)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            pathlib.Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)
'''


def _bts_fit(args: list[str], env: dict, **kw):
    return subprocess.Popen([sys.executable, "-m", "bts.cli.main", "fit", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, fit_env):
    """`bts fit` of a stitch stage (gate dropout on) killed with SIGKILL mid-epoch, resumed from last.ckpt, ends with
    the same stitch weights and final loss as an uninterrupted run (CPU, deterministic)."""
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "pause_cb.py").write_text(PAUSE_CALLBACK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "helpers"), str(REPO / "src")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    # 5 batches per epoch, 8 steps: the run crosses an epoch boundary; checkpoints every 2 steps; the kill comes
    # after step 7, i.e. mid-epoch 1 (last.ckpt = step 6, one batch into epoch 1)
    data = tf.data_config(tmp_path, fit_env["tok"], fit_env["sources"], num_train_samples=20, batch_size=4)

    def config(name: str, extra_callbacks=()):
        ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / name / "ckpt"), "save_last": True,
                              "every_n_train_steps": 2, "save_top_k": 0}}
        trainer = tf.trainer_config(tmp_path / name, max_steps=8, callbacks=[ckpt, *extra_callbacks],
                                    deterministic=True, limit_val_batches=1, val_check_interval=3)
        return tf.write_config(tmp_path / f"{name}{len(extra_callbacks)}.yaml",
                               _stitch_model(fit_env, tmp_path / name / "out"), data, trainer)

    full = _bts_fit(["--config", str(config("full"))], env)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out[-3000:]

    marker = tmp_path / "paused"
    pause = {"class_path": "pause_cb.PauseAt", "init_args": {"step": 7, "marker": str(marker)}}
    killed = _bts_fit(["--config", str(config("resumed", [pause]))], env)
    deadline = time.time() + 300
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), killed.communicate()[0][-3000:]
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not (tmp_path / "resumed" / "out").exists()  # no artifact from the killed run

    resumed = _bts_fit(["--config", str(config("resumed")), "--ckpt_path", str(last)], env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    # the first run's config is kept, the resumed run's is saved beside it
    assert (tmp_path / "resumed" / "logs" / "config.yaml").is_file()
    assert (tmp_path / "resumed" / "logs" / "config.resumed-1.yaml").is_file()

    a = load_file(str(tmp_path / "full" / "out" / "stitch.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "out" / "stitch.safetensors"))
    assert a.keys() == b.keys()
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    loss_a = json.loads((tmp_path / "full" / "out" / "training.json").read_text())["final_metrics"]["train/loss"]
    loss_b = json.loads((tmp_path / "resumed" / "out" / "training.json").read_text())["final_metrics"]["train/loss"]
    print(f"resume: max |stitch weight diff| = {max_diff:.3g}, final loss {loss_a!r} vs {loss_b!r}")
    assert max_diff <= 1e-6 and abs(loss_a - loss_b) <= 1e-6
    # the comparison is not vacuous: training moved the stitch weights away from the identity init
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "gate" in k)


def test_reproduce_run_fit_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    """A fit stage: an interrupted stage (record 'started', same hash) resumes from last.ckpt with
    weights_only=True; an unreadable last.ckpt or a changed config restarts the stage from scratch."""
    import bts.cli.lightning
    from bts.pipeline.profile import Profile, StageSpec
    from bts.pipeline.run import Pipeline

    ckpt_dir, out_dir = tmp_path / "runs" / "ckpt" / "s", tmp_path / "runs" / "s"
    cfg = tmp_path / "s.yaml"

    def write_cfg(lr):
        cfg.write_text(f"""
model:
  class_path: bts.dense.module.CausalLMModule
  init_args: {{output_dir: {out_dir}, lr: {lr}}}
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt_dir}, save_last: true, every_n_train_steps: 2}}
""")

    calls, resumed_marks = [], []

    class FakeTrainer:
        callbacks = ()

        def __init__(self, crash):
            self.crash = crash

        def fit(self, model, datamodule=None, ckpt_path=None, weights_only=None):
            calls.append((ckpt_path, weights_only))
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {}, "global_step": 2}, ckpt_dir / "last.ckpt")
            if self.crash:
                raise KeyboardInterrupt  # the process dies mid-stage
            out_dir.mkdir(parents=True, exist_ok=True)

    crash = {"value": True}
    monkeypatch.setattr(bts.cli.lightning, "run_lightning",
                        lambda args, run=True: type("CLI", (), {"trainer": FakeTrainer(crash["value"]), "model": None,
                                                                "datamodule": None})())
    monkeypatch.setattr(bts.cli.lightning, "mark_resuming", lambda trainer, label="resumed": resumed_marks.append(label))
    profile = Profile(profile="t", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"), stages=[])
    stage = StageSpec(name="s", kind="fit", config=str(cfg))

    def run_fit():  # as a new `bts reproduce` runs the stage (not evaluated)
        pipe = Pipeline(profile, 0, progress=False)
        return pipe.run_stage(stage, pipe.prepare(stage), evaluate=False)

    write_cfg(0.1)
    with pytest.raises(KeyboardInterrupt):
        run_fit()
    crash["value"] = False
    run_fit()  # a new `bts reproduce` resumes
    assert calls[-1] == (str(ckpt_dir / "last.ckpt"), True) and resumed_marks == ["rerun", "resumed"]
    assert run_fit() == out_dir and len(calls) == 2  # done: reused

    # interrupted again, but last.ckpt is truncated: restart from scratch (the checkpoint dir is cleared)
    write_cfg(0.2)
    crash["value"] = True
    with pytest.raises(KeyboardInterrupt):
        run_fit()
    data = (ckpt_dir / "last.ckpt").read_bytes()
    (ckpt_dir / "last.ckpt").write_bytes(data[: len(data) // 2])
    crash["value"] = False
    run_fit()
    assert calls[-1] == (None, True)
    # a changed config never resumes another config's checkpoint
    write_cfg(0.3)
    run_fit()
    assert calls[-1] == (None, True)


# ------------------------------------------------------------------------------------------- atomic outputs
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name != ".lock")


def test_atomic_writers_turn_enospc_into_one_error_and_leave_nothing(tmp_path):
    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(BTSError, match="no space left on device while writing .*metrics.json"), \
            atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{")
        disk_full()
    with pytest.raises(BTSError, match="no space left"), atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        disk_full()
    assert _leftovers(tmp_path) == []
    # an existing artifact survives a failed replacement untouched
    atomic_write_json(tmp_path / "metrics.json", {"ok": 1})
    with pytest.raises(BTSError, match="no space left"), atomic_path(tmp_path / "metrics.json") as tmp:
        disk_full()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"ok": 1} and _leftovers(tmp_path) == ["metrics.json"]


def test_token_cache_enospc_leaves_no_partial_files(tmp_path, fit_env, monkeypatch):
    from bts.data.datamodule import DomainMixDataModule

    def partial_then_full(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", partial_then_full)
    dm = DomainMixDataModule(**tf.data_config(tmp_path, fit_env["tok"], fit_env["sources"])["init_args"])
    with pytest.raises(BTSError, match="no space left on device while writing .*tokens"):
        dm.setup("fit")
    assert not (tmp_path / "cache" / "tokens").exists() or _leftovers(tmp_path / "cache" / "tokens") in ([], ["general"])


def test_corpus_enospc_leaves_no_partial_domain(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from bts.data import corpus
    from bts.data.sources import Provenance, code

    monkeypatch.setattr(code, "build", lambda config, wheel_dir, progress=None: (
        [{"text": f"def f{i}(): return {i}", "domain": "code"} for i in range(50)], Provenance(sources=[])))
    written = []

    def dumps(obj, **kw):
        written.append(obj)
        if len(written) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return json.dumps(obj, **kw)

    monkeypatch.setattr(corpus, "json", SimpleNamespace(dumps=dumps, loads=json.loads))
    with pytest.raises(BTSError, match="no space left"):
        corpus.ensure_built(tmp_path, ("code",), progress=False)
    assert _leftovers(tmp_path / "data") == []


def test_corpus_manifest_hash_mismatch_rebuilds(tmp_path, monkeypatch, caplog):
    import logging

    from bts.data import corpus
    from bts.data.sources import Provenance, code

    builds = []

    def build(config, wheel_dir, progress=None):
        builds.append(1)
        return [{"text": f"def f{i}(): return {i}", "domain": "code"} for i in range(200)], Provenance(sources=[])

    monkeypatch.setattr(code, "build", build)
    data = corpus.ensure_built(tmp_path, ("code",), progress=False)
    man_path = data / "code" / "manifest.json"
    man = json.loads(man_path.read_text())
    good = (data / "code" / "train.jsonl").read_bytes()
    man["files"]["train.jsonl"]["sha256"] = "0" * 64
    man_path.write_text(json.dumps(man))
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        recs = corpus.load_split("code", "train", cache_dir=tmp_path)
    assert len(builds) == 2 and (data / "code" / "train.jsonl").read_bytes() == good and recs
    assert json.loads(man_path.read_text())["files"]["train.jsonl"]["sha256"] != "0" * 64
    assert any("corrupt" in r.message and "sha256" in r.message for r in caplog.records)


def test_token_cache_corruption_is_detected_and_rebuilt(tmp_path, fit_env, caplog):
    import logging

    from bts.data.datamodule import DomainMixDataModule

    args = tf.data_config(tmp_path, fit_env["tok"], fit_env["sources"])["init_args"]
    dm = DomainMixDataModule(**args)
    dm.setup("fit")
    good = dm.token_stream("code", "train")
    path = next((tmp_path / "cache" / "tokens" / "code").glob("train-*.npy"))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a flipped bit in the data: np.load still succeeds
    path.write_bytes(bytes(raw))
    assert not np.array_equal(np.load(path), good)
    with caplog.at_level(logging.WARNING, logger="bts.data"):
        again = DomainMixDataModule(**args).token_stream("code", "train")
    assert np.array_equal(again, good) and np.array_equal(np.load(path), good)
    assert any("sha256" in r.message for r in caplog.records)


def test_results_and_checkpoints_are_written_atomically():
    """Every artifact writer goes through bts.core.io's temp+rename helpers (a grep over the sources)."""
    import re

    offenders = []
    for path in (REPO / "src").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\.savefig\(|np\.save\(|json\.dump\(", code) and "tmp" not in code and "f," not in code:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert offenders == []


# ----------------------------------------------------------------------------------------- numerical faults
def _dense_module(**kw):
    from bts.dense.modeling import LlamaArch
    from bts.dense.module import CausalLMModule

    arch = LlamaArch(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CausalLMModule(arch=arch, lr=1e-2, warmup_steps=1, **kw)


def _loader():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (64, 12), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": r} for r in ids], batch_size=8)


class _Inject(L.Callback):
    def __init__(self, step, what):
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.what == "weights":
                with torch.no_grad():
                    module.model.model.embed_tokens.weight[:] = float("nan")
            else:
                module.model.lm_head.weight.register_hook(lambda g: g * float("nan"))


@pytest.mark.parametrize("what, message", [("weights", r"non-finite training loss \(nan\) at step 4"),
                                           ("grad", r"non-finite gradient at step 4 .*model\.lm_head\.weight")])
def test_non_finite_loss_or_gradient_stops_and_keeps_last_good_checkpoint(tmp_path, what, message):
    module = _dense_module(output_dir=str(tmp_path / "out"))
    cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1,
                                             save_top_k=0)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, callbacks=[cb, _Inject(3, what)],
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BTSError, match=message) as err:
        trainer.fit(module, train_dataloaders=_loader())
    assert "\n" not in str(err.value)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "out").exists()  # no artifact from a failed stage
    if what == "grad":  # the failing step never reached the optimizer
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_stitch_gates_are_checked_finite(saved_llama_family):
    from bts.stitch.model import StitchedLM

    seed_dir, dirs = saved_llama_family
    model = StitchedLM.from_pretrained_dirs(seed_dir, dirs[:2], num_stitch_layers=2).eval()
    x = torch.randint(0, 97, (1, 6))
    model(x)
    with torch.no_grad():
        model.stitch_layers[1].stitch_gate.weight[0, 0] = float("nan")
    with pytest.raises(BTSError, match=r"stitch layer 1 \(after layer 4, e2h\) produced non-finite gate values"):
        model(x)
    with torch.no_grad():
        model.stitch_layers[1].stitch_gate.weight[0, 0] = 0.0
        model.stitch_layers[0].stitch_gate.weight[0, 0] = float("nan")
    with pytest.raises(BTSError, match=r"stitch layer 0 \(after layer 2, h2e\)"):
        model(x)


# -------------------------------------------------------------------------------------------- safe loading
def _pwn(path):  # what a malicious checkpoint would run on unpickling
    Path(path).write_text("pwned")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_pwn, (self.marker,))


def test_pickle_bearing_checkpoint_is_refused(tmp_path, fit_env, capsys):
    from bts.core.io import check_lightning_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": _Evil(str(marker))}, evil)
    with pytest.raises(BTSError, match="refusing to load checkpoint .*weights_only=True"):
        check_lightning_checkpoint(evil)
    cfg = tf.write_config(tmp_path / "c.yaml", _stitch_model(fit_env, tmp_path / "out"),
                          tf.data_config(tmp_path, fit_env["tok"], fit_env["sources"]), tf.trainer_config(tmp_path))
    rc = bts_main(["fit", "--config", str(cfg), "--ckpt_path", str(evil)])
    err = capsys.readouterr().err
    assert rc == 2 and len(_error_lines(err)) == 1 and "refusing to load checkpoint" in err
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "out").exists()


def test_no_remote_code_and_safetensors_only():
    import re

    src = "\n".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    assert not re.search(r"trust_remote_code\s*=\s*True", src)
    assert not re.search(r"weights_only\s*=\s*False", src)
    assert not re.search(r"safe_serialization\s*=\s*False", src)
    assert "use_safetensors=True" in (REPO / "src" / "bts" / "dense" / "modeling.py").read_text()


# ------------------------------------------------------------------------------------------------ concurrency
def _profile(tmp_path, name="p") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"profile: {name}\nruns_dir: {tmp_path / 'runs'}\nresults_dir: {tmp_path / 'results'}\n"
                    "stages: []\n")
    return path


def test_second_reproduce_on_the_same_run_dir_fails_at_once(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time\nfrom bts.core.io import exclusive_lock\n"
                                f"with exclusive_lock({str(tmp_path / 'runs' / '.lock')!r}, 'x'):\n"
                                "    print('locked', flush=True)\n    time.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t = time.perf_counter()
        rc = bts_main(["reproduce", "--profile", str(_profile(tmp_path)), "--no-progress"])
        took = time.perf_counter() - t
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert rc == 2 and took < 5, took
    expected = (f"error: run directory {tmp_path / 'runs'} is in use by pid {holder.pid} "
                f"(lock {tmp_path / 'runs' / '.lock'}); wait for it or use another directory")
    assert _error_lines(err) == [expected]
