"""Bad input through the real CLI entry (`bts.cli.main`, in process): each case prints exactly one line
``error: ...`` on stderr (no traceback), exits 2, and leaves no partial output (no artifact, no checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import lightning  # noqa: F401  (imported here so its log handler binds to the session's stderr, not a test's capsys)
import numpy as np
import pytest
import torch
import yaml

import tiny_fit as tf
from bts.cli import main as bts_main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    sources = tf.write_corpus(root / "corpus")
    tok = tf.write_tokenizer(root / "tok")
    v = len(tok)
    models = {
        "seed": tf.save_llama(root / "seed", 0, v),
        "code": tf.save_llama(root / "code", 0, v, noise=0.02),
        "math": tf.save_llama(root / "math", 1, v, noise=0.02),
        "wide": tf.save_llama(root / "wide", 0, v, d=48),
        "shallow": tf.save_llama(root / "shallow", 0, v, layers=2),
        "bigvocab": tf.save_llama(root / "bigvocab", 0, v + 5),
        "bigvocab2": tf.save_llama(root / "bigvocab2", 1, v + 5, noise=0.02),
        "smallvocab": tf.save_llama(root / "smallvocab", 0, v - 5),
        "smallvocab2": tf.save_llama(root / "smallvocab2", 1, v - 5, noise=0.02),
    }
    for name, mutate in (("truncated", lambda b: b[: len(b) // 2]),
                         ("corrupt", lambda b: b[:8] + b"{garbage" + b[16:])):
        shutil.copytree(models["code"], root / name)
        p = root / name / "model.safetensors"
        p.write_bytes(mutate(p.read_bytes()))
        models[name] = root / name
    (root / "empty.jsonl").write_text("")
    (root / "one.jsonl").write_text(json.dumps({"text": "x = 1 + 2"}) + "\n")
    return {"root": root, "sources": sources, "tok": root / "tok", "models": models}


def _run(tmp_path, env, capsys, *, model=None, data=None, trainer=None, extra=(), raw=None, trained=False,
         expect_ok=False):
    """`bts fit --config <tmp>/c.yaml [extra]` with a valid tiny stitch config, modified by the keyword dicts."""
    m = env["models"]
    init = {"hub": str(m["seed"]), "hub_name": "seed", "experts": [str(m["code"]), str(m["math"])],
            "expert_names": ["code", "math"], "stitch": {"num_stitch_layers": 2}, "output_dir": str(tmp_path / "out")}
    init.update(model or {})
    data = dict(data or {})
    data_cfg = tf.data_config(tmp_path, env["tok"], data.pop("sources", env["sources"]), **data)
    trainer_cfg = tf.trainer_config(tmp_path, **{"max_steps": 2, **(trainer or {})})
    trainer_cfg["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1}}]
    cfg = {"seed_everything": 0, "trainer": trainer_cfg,
           "model": {"class_path": "bts.stitch_module.StitchModule", "init_args": init}, "data": data_cfg}
    if raw:
        raw(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    rc = bts_main(["fit", "--config", str(path), *extra])
    err = capsys.readouterr().err
    if expect_ok:
        assert rc == 0, err[-2000:]
        return None
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists()
    assert trained or not (tmp_path / "ckpt").exists()  # checkpoints only of steps that trained fine
    print(lines[0])
    return lines[0]


def _models(env, *names):
    return [str(env["models"][n]) for n in names]


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("other, key", [("wide", "hidden_size=48"), ("shallow", "num_layers=2"),
                                        ("bigvocab", "vocab_size=")])
def test_experts_with_other_dimensions(tmp_path, env, capsys, other, key):
    line = _run(tmp_path, env, capsys, model={"experts": _models(env, "code", other), "expert_names": ["code", "x"]})
    assert f"model 'x' has {key}" in line and "all stitched models must share" in line


def test_tokenizer_larger_than_model_vocab(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, model={"hub": str(env["models"]["smallvocab"]),
                                              "experts": _models(env, "smallvocab2"), "expert_names": ["code"]})
    assert "vocab_size=" in line and "is smaller than the tokenizer's" in line


def test_model_vocab_padded_beyond_tokenizer_trains(tmp_path, env, capsys):
    # Qwen2.5-style checkpoints pad the embedding past the tokenizer: that is valid input, not a mismatch
    _run(tmp_path, env, capsys, expect_ok=True, model={"hub": str(env["models"]["bigvocab"]),
                                                      "experts": _models(env, "bigvocab2"), "expert_names": ["code"]})
    assert (tmp_path / "out" / "stitch.safetensors").is_file()


def test_missing_model_directory(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, model={"hub": str(tmp_path / "nope")})
    assert line == f"error: not a Hugging Face model directory (no config.json): {tmp_path / 'nope'}"


@pytest.mark.parametrize("which, detail", [("truncated", "incomplete metadata"), ("corrupt", "invalid JSON in header")])
def test_truncated_or_corrupt_safetensors(tmp_path, env, capsys, which, detail):
    line = _run(tmp_path, env, capsys, model={"experts": _models(env, which, "math")})
    assert line.startswith(f"error: cannot load model from {env['models'][which]}") and detail in line


def test_missing_and_truncated_lightning_checkpoint(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, extra=["--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert line == f"error: checkpoint not found: {tmp_path / 'missing.ckpt'}"
    ckpt = tmp_path / "trunc.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    line = _run(tmp_path, env, capsys, extra=["--ckpt_path", str(ckpt)])
    assert line.startswith(f"error: checkpoint {ckpt} is truncated or corrupt")


def test_corrupt_stitch_checkpoint(tmp_path, env, capsys):
    from bts.model import StitchedLM
    from bts.stitch_checkpoint import save_stitched

    m = env["models"]
    ckpt = save_stitched(StitchedLM.from_pretrained_dirs(m["seed"], [m["code"]], num_stitch_layers=2,
                                                         hub_name="seed", expert_names=["code"]), tmp_path / "bts")
    raw = bytearray((ckpt / "stitch.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (ckpt / "stitch.safetensors").write_bytes(bytes(raw))
    line = _run(tmp_path, env, capsys, model={"init_stitch_from": str(ckpt)})
    assert "stitch.safetensors does not match the sha256 recorded in bts.json" in line


@pytest.mark.parametrize("k, expect", [(5, "stitch.num_stitch_layers=5 exceeds the models' 4 layers"),
                                       (0, "stitch.num_stitch_layers must be >= 1, got 0"),
                                       (-2, "stitch.num_stitch_layers must be >= 1, got -2")])
def test_bad_number_of_stitch_layers(tmp_path, env, capsys, k, expect):
    assert _run(tmp_path, env, capsys, model={"stitch": {"num_stitch_layers": k}}) == f"error: {expect}"


def test_zero_experts(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, model={"experts": [], "expert_names": None})
    assert line == "error: BTS needs at least one expert directory besides the hub"


def test_same_expert_twice(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, model={"experts": _models(env, "code", "code")})
    assert line == f"error: the same model directory is passed twice: {env['models']['code']}"


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("data, expect", [
    ({"mixture": {"general": 1.0, "physics": 1.0}}, "unknown domain 'physics' in mixture"),
    ({"eval_domains": ["general", "physics"]}, "unknown domain 'physics'; known domains"),
    ({"mixture": {"general": 1.0, "code": -0.5}}, "mixture weight for 'code' is negative: -0.5"),
    ({"mixture": {"general": 0.0, "code": 0.0}}, "mixture weights are all zero"),
    ({"mixture": "expert_physics"}, "unknown mixture preset 'expert_physics'"),
])
def test_bad_mixture_or_domain(tmp_path, env, capsys, data, expect):
    assert expect in _run(tmp_path, env, capsys, data=data)


def test_eval_domain_without_data(tmp_path, env, capsys):
    sources = {**env["sources"], "math": {"kind": "hf", "path": "json", "data_files": str(env["root"] / "one.jsonl")}}
    line = _run(tmp_path, env, capsys, data={"eval_domains": ["general", "math"], "sources": sources})
    assert "eval domain math has no val data" in line


def test_empty_dataset(tmp_path, env, capsys):
    sources = {**env["sources"], "code": {"kind": "hf", "path": "json", "data_files": str(env["root"] / "empty.jsonl")}}
    line = _run(tmp_path, env, capsys, data={"sources": sources})
    assert "domain code: dataset 'json'" in line and "is empty" in line
    sources["code"]["data_files"] = str(env["root"] / "one.jsonl")  # one record: nothing left once packed
    line = _run(tmp_path, env, capsys, data={"sources": sources, "eval_domains": ["general"]})
    assert "domain code has mixture weight 0.5 but its train data is empty" in line


def test_no_space_left_for_the_cache(tmp_path, env, capsys, monkeypatch):
    def disk_full(f, arr, allow_pickle=False):
        f.write(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    line = _run(tmp_path, env, capsys)
    assert line.startswith("error: no space left on device while writing ") and "/tokens/" in line
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or [p for p in tokens.rglob("*") if p.is_file()] == []


# ------------------------------------------------------------------------------------------ config keys
@pytest.mark.parametrize("where, expect", [
    ("model", "Problem with given class_path 'bts.stitch_module.StitchModule': Option 'bogus' is not accepted"),
    ("data", "Problem with given class_path 'bts.data.DomainMixDataModule': Option 'bogus' is not accepted"),
    ("trainer", "bogus"),
    ("top", "bogus"),
])
def test_unknown_config_key(tmp_path, env, capsys, where, expect):
    def add(cfg):
        {"model": cfg["model"]["init_args"], "data": cfg["data"]["init_args"], "trainer": cfg["trainer"],
         "top": cfg}[where]["bogus"] = 1

    line = _run(tmp_path, env, capsys, raw=add)
    assert expect in line


def test_unknown_key_on_the_command_line(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, extra=["--model.init_args.stitch.bogus=1"])
    assert "bogus" in line
    line = _run(tmp_path, env, capsys, extra=["--trainer.max_stepz=3"])
    assert line == "error: unrecognized arguments: --trainer.max_stepz=3"


# ------------------------------------------------------------------------------------------------ output
def test_unwritable_output_directory(tmp_path, env, capsys):
    (tmp_path / "file").write_text("a file, not a directory")
    line = _run(tmp_path, env, capsys, model={"output_dir": str(tmp_path / "file" / "out")})
    assert line.startswith(f"error: cannot create output directory {tmp_path / 'file'}")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        line = _run(tmp_path, env, capsys, model={"output_dir": str(ro / "out")})
        assert line.startswith(f"error: output directory {ro} is not writable")


def test_non_finite_training_loss_is_one_line(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, model={"lr": 1e30, "warmup_steps": 0},
                trainer={"max_steps": 4, "gradient_clip_val": None}, trained=True)
    assert "non-finite" in line and "at step" in line
    for ckpt in (tmp_path / "ckpt").glob("*.ckpt"):  # the checkpoints kept are finite
        assert all(torch.isfinite(v).all() for v in torch.load(ckpt, weights_only=True)["state_dict"].values())


def test_results_dir_of_another_profile(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text(json.dumps({"profile": "tiny"}))
    prof = tmp_path / "mine.yaml"
    prof.write_text(f"profile: mine\nruns_dir: {tmp_path / 'runs'}\nresults_dir: {tmp_path / 'results'}\nstages: []\n")
    rc = bts_main(["reproduce", "--profile", str(prof), "--no-progress"])
    err = capsys.readouterr().err
    expected = (f"error: {tmp_path / 'results' / 'metrics.json'} holds results of profile 'tiny', not 'mine'; use "
                "another results_dir or pass --force-results to overwrite them")
    assert rc == 2 and [ln for ln in err.splitlines() if ln.startswith("error:")] == [expected]
    assert json.loads((tmp_path / "results" / "metrics.json").read_text()) == {"profile": "tiny"}
