"""Nothing lost in `bts fit` (issue 23): SIGTERM / SIGINT save a resumable checkpoint and exit 143 / 130 with the
command that resumes; the resume matches an uninterrupted run; a finished output is refused (or retrained with
--force); an interrupted run of the same config is resumed by re-running the command; trainer values Lightning
rejects are one error line."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning  # noqa: F401  (its log handler binds to the session's stderr, not a test's capsys)
import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_fit as tf
from bts.cli.main import main as bts_main

REPO = Path(__file__).resolve().parents[1]

HOLD_CALLBACK = '''
import pathlib, time
import lightning as L


class HoldAt(L.Callback):
    """At the end of batch ``step`` (before ``InterruptCheckpoint`` looks, it runs after the config's callbacks):
    write ``marker`` and wait until the test has sent its signal (``marker + '.sent'``), at most 60 s."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pathlib.Path(self.marker).write_text(str(trainer.global_step))
            deadline = time.time() + 60
            while not pathlib.Path(self.marker + ".sent").exists() and time.time() < deadline:
                time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    sources = tf.write_corpus(root / "corpus")
    tok = tf.write_tokenizer(root / "tok")
    vocab = len(tok)
    (root / "helpers").mkdir()
    (root / "helpers" / "hold_cb.py").write_text(HOLD_CALLBACK)
    return {"root": root, "sources": sources, "tok": root / "tok", "hub": tf.save_llama(root / "seed", 0, vocab),
            "code": tf.save_llama(root / "code", 0, vocab, noise=0.02),
            "math": tf.save_llama(root / "math", 1, vocab, noise=0.02)}


def _config(env, run: Path, hold: Path | None = None, max_steps: int = 8) -> Path:
    """A stitch stage (gate dropout on: the resume must reproduce the RNG too), 5 batches per epoch (the run crosses
    an epoch boundary), periodic checkpoints every 2 steps into ``run/ckpt``."""
    model = {"class_path": "bts.stitch.module.StitchModule",
             "init_args": {"hub": str(env["hub"]), "hub_name": "seed", "experts": [str(env["code"]), str(env["math"])],
                           "expert_names": ["code", "math"], "stitch": {"num_stitch_layers": 2, "gate_dropout": 0.1},
                           "lr": 5e-3, "warmup_steps": 2, "output_dir": str(run / "out")}}
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run / "ckpt"), "save_last": True, "every_n_train_steps": 2,
                                "save_top_k": 0}}]
    if hold is not None:
        callbacks.append({"class_path": "hold_cb.HoldAt", "init_args": {"step": 3, "marker": str(hold)}})
    data = tf.data_config(env["root"], env["tok"], env["sources"], num_train_samples=20, batch_size=4)
    trainer = tf.trainer_config(run, max_steps=max_steps, callbacks=callbacks, deterministic=True,
                                limit_val_batches=1, val_check_interval=3)
    run.mkdir(parents=True, exist_ok=True)
    return tf.write_config(run / "c.yaml", model, data, trainer)


def _subprocess_env(env) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(env["root"] / "helpers"), str(REPO / "src")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}


def _bts(args: list[str], env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bts.cli.main", *args], env=_subprocess_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(args: list[str], env, marker: Path, sig: int) -> tuple[int, str]:
    """Run ``bts <args>``, send ``sig`` once the hold callback reports step 3, return (status, stderr)."""
    proc = _bts(args, env)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    Path(f"{marker}.sent").write_text("")
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(env) -> dict:
    """The stitch weights of the 8-step run that no signal interrupts (a subprocess, like the runs compared)."""
    run = env["root"] / "uninterrupted"
    full = _bts(["fit", "--config", str(_config(env, run))], env)
    _, err = full.communicate(timeout=600)
    assert full.returncode == 0, err[-3000:]
    return _stitch_weights(run)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _stitch_weights(run: Path) -> dict:
    return load_file(str(run / "out" / "stitch.safetensors"))


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_printed_command_resumes_exactly(tmp_path, env, uninterrupted):
    run, marker = tmp_path / "run", tmp_path / "held"
    cfg = _config(env, run, hold=marker)
    rc, err = _interrupt(["fit", "--config", str(cfg)], env, marker, signal.SIGTERM)
    last = run / "ckpt" / "last.ckpt"
    lines = _error_lines(err)
    assert rc == 143, err[-3000:]
    assert len(lines) == 1 and "interrupted by SIGTERM after step 3" in lines[0] and str(last) in lines[0], err
    assert "Traceback" not in err
    # a full Lightning checkpoint at the step boundary, not the periodic one of step 2; no artifact
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["loops"]
    assert not (run / "out").exists() and not list((run / "ckpt").glob(".*tmp"))

    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:2] == ["bts", "fit"] and command[-2:] == ["--ckpt_path", str(last)]
    resumed = _bts(command[1:], env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    # the datamodule skips the batches already trained: Lightning's "not resumable" warning would be wrong
    assert "not resumable" not in err

    diff = _max_diff(uninterrupted, _stitch_weights(run))
    print(f"SIGTERM at step 3, resumed: max |stitch weight diff| vs uninterrupted = {diff:.3g}")
    assert diff <= 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in uninterrupted.items() if "gate" in k)  # training moved the gates


@pytest.mark.slow
def test_sigint_exits_130_and_rerunning_the_command_resumes_then_refuses(tmp_path, env, uninterrupted, capsys):
    run, marker = tmp_path / "run", tmp_path / "held"
    args = ["fit", "--config", str(_config(env, run, hold=marker))]
    rc, err = _interrupt(args, env, marker, signal.SIGINT)
    assert rc == 130 and "interrupted by SIGINT after step 3" in err, err[-3000:]

    again = _bts(args, env)  # the same command: same config, so it resumes from last.ckpt on its own
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"bts fit: resuming the interrupted run from {run / 'ckpt' / 'last.ckpt'}" in err
    assert _max_diff(uninterrupted, _stitch_weights(run)) <= 1e-6

    # a third time: the output is finished, so the run is refused before anything is built
    before = (run / "out" / "stitch.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert bts_main(args) == 2
    took = time.perf_counter() - t
    err = capsys.readouterr().err
    assert _error_lines(err) == [(f"error: refusing to overwrite {run / 'out'} (model.init_args.output_dir): it holds a "
                                 "BTS stitch checkpoint (bts.json); this bts fit would train again and replace it: use "
                                 "a fresh --run_dir (or another output_dir), or pass --force to retrain")], err
    assert took < 5 and (run / "out" / "stitch.safetensors").stat().st_mtime_ns == before


def test_force_retrains_a_finished_output_and_another_configs_checkpoint_is_refused(tmp_path, env, capsys):
    run = tmp_path / "run"
    cfg = _config(env, run, max_steps=2)
    assert bts_main(["fit", "--config", str(cfg)]) == 0
    first = _stitch_weights(run)
    capsys.readouterr()

    assert bts_main(["fit", "--config", str(cfg), "--force", "--model.init_args.lr", "0.02"]) == 0
    err = capsys.readouterr().err
    assert "bts fit: --force: training from scratch" in err
    assert (run / "logs" / "config.yaml").is_file() and (run / "logs" / "config.rerun-1.yaml").is_file()
    assert "force" not in yaml.safe_load((run / "logs" / "config.rerun-1.yaml").read_text())
    second = _stitch_weights(run)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # retrained with the new lr

    # an interrupted run's last.ckpt, but this command's configuration differs: refused, nothing trained
    other = tmp_path / "other"
    cfg = _config(env, other, max_steps=2)
    (other / "ckpt").mkdir(parents=True)
    (other / "ckpt" / "last.ckpt").write_bytes((run / "ckpt" / "last.ckpt").read_bytes())
    assert bts_main(["fit", "--config", str(cfg)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "holds an earlier run of another configuration" in lines[0]
    assert "--ckpt_path" in lines[0] and "--force" in lines[0] and not (other / "out").exists()


@pytest.mark.parametrize("override, message", [
    (["--trainer.max_steps", "-5"], "trainer.max_steps must be a non-negative integer or -1 (infinite steps), got -5"),
    (["--trainer.max_epochs=-2"], "trainer.max_epochs must be a non-negative integer or -1 (no limit), got -2"),
    (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be a positive integer, got 0"),
    (["--trainer.limit_train_batches", "1.5"], ("trainer.limit_train_batches must be a fraction in [0.0, 1.0] or a "
                                               "batch count, got 1.5")),
    (["--trainer.devices", "0"], ("invalid trainer setting: `Trainer(devices='0')` value is not a valid input using cpu "
                                 "accelerator.")),
    (["--trainer.precision", "7"], 'Parser key "trainer.precision"'),
])
def test_trainer_values_lightning_rejects_are_one_error_line(tmp_path, env, capsys, override, message):
    cfg = _config(env, tmp_path / "run")
    assert bts_main(["fit", "--config", str(cfg), *override]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run" / "out").exists() and not (tmp_path / "run" / "ckpt").exists()


def test_force_belongs_to_fit_only(tmp_path, env, capsys):
    assert bts_main(["validate", "--config", str(_config(env, tmp_path / "run")), "--force"]) == 2
    assert _error_lines(capsys.readouterr().err) == ["error: --force is an option of bts fit, not of bts validate"]


def test_the_checkpoint_with_more_steps_is_resumed_of_last_and_slurm_hpc(tmp_path):
    """Lightning's SLURM auto-requeue saves hpc_ckpt_<n>.ckpt on SIGUSR1; if the job's SIGTERM then came too late for
    a step boundary, last.ckpt is older and the requeued `bts fit` resumes the hpc checkpoint instead."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from bts.cli.fit_guard import resumable_checkpoint

    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = SimpleNamespace(checkpoint_callbacks=[cb], default_root_dir=str(tmp_path / "logs"))
    assert resumable_checkpoint(trainer) is None
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "logs").mkdir()
    torch.save({"state_dict": {}, "global_step": 40}, tmp_path / "ckpt" / "last.ckpt")
    assert resumable_checkpoint(trainer) == tmp_path / "ckpt" / "last.ckpt"
    for n, step in ((1, 30), (2, 45), (10, 50)):  # hpc_ckpt_10 is the last one saved (numeric, not text, order)
        torch.save({"state_dict": {}, "global_step": step}, tmp_path / "logs" / f"hpc_ckpt_{n}.ckpt")
    assert resumable_checkpoint(trainer) == tmp_path / "logs" / "hpc_ckpt_10.ckpt"
    torch.save({"state_dict": {}, "global_step": 52}, tmp_path / "ckpt" / "last.ckpt")
    assert resumable_checkpoint(trainer) == tmp_path / "ckpt" / "last.ckpt"
