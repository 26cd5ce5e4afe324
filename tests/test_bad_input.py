"""Bad input through the real CLI entry (`bts.cli.main.main`, in process): each case prints exactly one line
``error: ...`` on stderr (no traceback), exits 2, and leaves no partial output (no artifact, no checkpoint)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import lightning  # noqa: F401  (imported here so its log handler binds to the session's stderr, not a test's capsys)
import numpy as np
import pytest
import torch
import yaml

import tiny_fit as tf
from bts.cli.main import main as bts_main

ROOT = Path(__file__).resolve().parents[1]


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
           "model": {"class_path": "bts.stitch.module.StitchModule", "init_args": init}, "data": data_cfg}
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


# the detail is safetensors' own wording: its older releases name the error kind instead
@pytest.mark.parametrize("which, detail", [("truncated", "incomplete metadata|MetadataIncompleteBuffer"),
                                           ("corrupt", "invalid JSON in header|InvalidHeaderDeserialization")])
def test_truncated_or_corrupt_safetensors(tmp_path, env, capsys, which, detail):
    line = _run(tmp_path, env, capsys, model={"experts": _models(env, which, "math")})
    assert line.startswith(f"error: cannot load model from {env['models'][which]}") and re.search(detail, line)


def test_missing_and_truncated_lightning_checkpoint(tmp_path, env, capsys):
    line = _run(tmp_path, env, capsys, extra=["--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert line == f"error: checkpoint not found: {tmp_path / 'missing.ckpt'}"
    ckpt = tmp_path / "trunc.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    line = _run(tmp_path, env, capsys, extra=["--ckpt_path", str(ckpt)])
    assert line.startswith(f"error: checkpoint {ckpt} is truncated")
    # not a zip archive at all (the head of a safetensors file): no advice to unpickle it with weights_only=False
    other = tmp_path / "other.ckpt"
    other.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"w": {"dtype": "F32"')
    line = _run(tmp_path, env, capsys, extra=["--ckpt_path", str(other)])
    assert line.startswith(f"error: checkpoint {other} is truncated or not a PyTorch checkpoint")
    assert "weights_only" not in line and "pickled" not in line


def test_corrupt_stitch_checkpoint(tmp_path, env, capsys):
    from bts.stitch.checkpoint import save_stitched
    from bts.stitch.model import StitchedLM

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
    assert line.startswith(f"error: the same model directory is passed twice: {env['models']['code']}")
    assert f"cp -r {env['models']['code']} " in line  # and how to do it


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
# jsonargparse words the refusal "Option 'bogus' is not accepted" from 4.44 on, "Key 'bogus' is not expected" before
@pytest.mark.parametrize("where, expect", [
    ("model", "Problem with given class_path 'bts.stitch.module.StitchModule': .*'bogus' is not (accepted|expected)"),
    ("data", "Problem with given class_path 'bts.data.DomainMixDataModule': .*'bogus' is not (accepted|expected)"),
    ("trainer", "bogus"),
    ("top", "bogus"),
])
def test_unknown_config_key(tmp_path, env, capsys, where, expect):
    def add(cfg):
        {"model": cfg["model"]["init_args"], "data": cfg["data"]["init_args"], "trainer": cfg["trainer"],
         "top": cfg}[where]["bogus"] = 1

    line = _run(tmp_path, env, capsys, raw=add)
    assert re.search(expect, line), line


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


# ------------------------------------------------------------------- run paths, checked before training
@pytest.mark.parametrize("where", ["default_root_dir", "logger", "checkpoint"])
def test_unwritable_log_or_checkpoint_directory_is_refused_before_training(tmp_path, env, capsys, where):
    (tmp_path / "file").write_text("a file, not a directory")
    bad = str(tmp_path / "file" / "sub")

    def point(cfg):
        if where == "default_root_dir":
            cfg["trainer"]["default_root_dir"] = bad
        elif where == "logger":
            cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                        "init_args": {"save_dir": bad, "name": "x"}}
        else:
            cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = bad

    line = _run(tmp_path, env, capsys, raw=point)
    assert line.startswith(f"error: cannot create output directory {bad}") and "is a file, not a directory" in line
    assert not (tmp_path / "logs").exists()  # nothing of the run was started


def test_in_process_runs_check_their_paths_before_fit(tmp_path, env):
    """`bts reproduce` / `bts sweep` build the run with run_lightning(run=False) and fit it themselves."""
    from bts.cli.lightning import run_lightning
    from bts.core.io import BTSError

    (tmp_path / "file").write_text("x")
    cfg = {"seed_everything": 0, "trainer": tf.trainer_config(tmp_path),
           "model": {"class_path": "bts.stitch.module.StitchModule",
                     "init_args": {"hub": str(env["models"]["seed"]), "experts": _models(env, "code"),
                                   "stitch": {"num_stitch_layers": 2}}},
           "data": tf.data_config(tmp_path, env["tok"], env["sources"])}
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"dirpath": str(tmp_path / "file" / "ckpt")}}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(BTSError, match="ModelCheckpoint dirpath"):
        run_lightning(["--config", str(path)], run=False)


def test_gpu_config_on_a_cpu_machine_names_the_override(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bts_main(["fit", "--config", str(ROOT / "configs/bts/scale/qwen2p5_1p5b.yaml")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: trainer.accelerator is 'gpu' but this machine has no CUDA")
    assert "--trainer.accelerator cpu" in lines[0]


# ------------------------------------------------------------------------- commands' output paths
def _rc(argv: list[str]) -> int:
    try:
        return bts_main(argv)
    except SystemExit as e:  # bts stitch-remove exits itself
        return e.code


def _one_error(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_parents_are_created_and_a_file_in_the_way_is_one_line(tmp_path, env, capsys):
    from bts.stitch.checkpoint import save_stitched
    from bts.stitch.model import StitchedLM

    m = env["models"]
    merge = ["merge", "--method", "soup", "--seed", str(m["seed"]), "--experts", str(m["code"]), "--out"]
    assert bts_main([*merge, str(tmp_path / "a" / "b" / "soup")]) == 0
    assert (tmp_path / "a" / "b" / "soup" / "config.json").is_file()
    ckpt = save_stitched(StitchedLM.from_pretrained_dirs(m["seed"], [m["code"], m["math"]], num_stitch_layers=2),
                         tmp_path / "bts")
    remove = ["stitch-remove", "--ckpt", str(ckpt), "--expert", "code", "--out"]
    assert _rc([*remove, str(tmp_path / "c" / "d" / "x")]) == 0
    (tmp_path / "file").write_text("x")
    cache = tmp_path / "fresh_cache"
    for argv in ([*merge, str(tmp_path / "file" / "soup")], [*remove, str(tmp_path / "file" / "x")],
                 ["data", "--cache-dir", str(cache), "--tokenizer", str(tmp_path / "file" / "tok")]):
        capsys.readouterr()
        assert _rc(argv) == 2
        assert "is a file, not a directory" in _one_error(capsys)
    assert not cache.exists()  # refused before the corpus was built


@pytest.mark.parametrize("key, value, says", [
    ("eval", {"batch_sise": 4}, "eval: unknown key 'batch_sise' (did you mean 'ppl_batch_size'?)"),
    ("eval", {"ppl_blocks": "2"}, "eval: ppl_blocks: expected an integer, got '2'"),
    ("eval", {"precision": "fp8"}, "eval: EvalConfig.precision must be one of 32, bf16-mixed, got 'fp8'"),
    ("eval_tasks", ["ppl", "math_mc_ac"], "eval_tasks: unknown task 'math_mc_ac'"),
    ("ablation_eval_tasks", ["pppl"], "ablation_eval_tasks: unknown task 'pppl'"),
])
def test_a_profile_typo_fails_at_load_before_any_stage(tmp_path, capsys, key, value, says):
    prof = tmp_path / "typo.yaml"
    stage = {"name": "seed", "kind": "fit", "config": str(ROOT / "configs/seed/tiny.yaml")}
    prof.write_text(yaml.safe_dump({"profile": "typo", "runs_dir": str(tmp_path / "runs"),
                                    "results_dir": str(tmp_path / "results"), "stages": [stage], key: value}))
    assert bts_main(["reproduce", "--profile", str(prof), "--no-progress"]) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: {prof}: {says}"), line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()  # nothing ran, nothing written


def _fake_lm_eval(root: Path, body: str) -> Path:
    """A package ``lm_eval`` (with ``lm_eval.tasks``) whose import runs ``body``, put first on the child's path."""
    (root / "lm_eval").mkdir(parents=True)
    (root / "lm_eval" / "__init__.py").write_text(body)
    (root / "lm_eval" / "tasks.py").write_text("")
    return root


def test_a_profile_with_lm_eval_stages_is_refused_before_any_stage_where_lm_eval_cannot_import(
        tmp_path, capsys, monkeypatch):
    """A node whose lm-eval lacks a package it imports (datasets without pyarrow, seen on the GPU image's stack):
    one line naming that package, before the first stage, nothing written."""
    monkeypatch.setenv("PYTHONPATH", str(_fake_lm_eval(tmp_path / "site", "import pyarrow_not_here\n")))
    prof = tmp_path / "harness.yaml"
    stages = [{"name": "seed", "kind": "fit", "config": str(ROOT / "configs/seed/tiny.yaml")},
              {"name": "lm_eval_seed", "kind": "command", "after": ["seed"], "report": "none",
               "args": ["eval", "--harness", "--model", "{runs}/seed", "--harness-tasks", "bts_code_ppl"]}]
    prof.write_text(yaml.safe_dump({"profile": "harness", "runs_dir": str(tmp_path / "runs"),
                                    "results_dir": str(tmp_path / "results"), "stages": stages}))
    assert bts_main(["reproduce", "--profile", str(prof), "--no-progress"]) == 2
    line = _one_error(capsys)
    assert "lm-eval cannot be imported: it needs the package 'pyarrow_not_here'" in line, line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_lm_eval_import_check_tells_missing_from_broken(tmp_path, monkeypatch):
    from bts.core.io import BTSError
    from bts.eval.harness_import import check_importable, import_error

    assert "lm-eval is not installed" in str(import_error(ModuleNotFoundError("x", name="lm_eval")))
    assert "needs the package 'pyarrow'" in str(import_error(ModuleNotFoundError("x", name="pyarrow.lib")))
    monkeypatch.setenv("PYTHONPATH", str(_fake_lm_eval(tmp_path / "ok", "x = 1\n")))
    check_importable()  # importable: no error
    monkeypatch.setenv("PYTHONPATH", str(_fake_lm_eval(tmp_path / "broken", "raise RuntimeError('boom')\n")))
    with pytest.raises(BTSError, match=r"lm-eval cannot be imported \(exit 1\): RuntimeError: boom"):
        check_importable()


def test_unknown_force_stage_lists_the_known_ones(capsys):
    profile = ROOT / "configs/reproduce/smoke.yaml"
    assert bts_main(["reproduce", "--profile", str(profile), "--force", "sed"]) == 2
    line = _one_error(capsys)
    assert line.startswith("error: --force: unknown stage 'sed' (stages of profile smoke: tokenizer, seed,")


def test_harness_task_with_an_uncached_hub_dataset(tmp_path, env, capsys, monkeypatch):
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(ds_config, name):
            monkeypatch.setattr(ds_config, name, True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text(
        "task: bts_uncached\ndataset_path: bts-nobody/not-cached\ntest_split: test\ndataset_kwargs:\n"
        f"  cache_dir: {tmp_path / 'hf'}\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    model = tmp_path / "m"
    shutil.copytree(env["models"]["seed"], model)
    shutil.copytree(env["tok"], model, dirs_exist_ok=True)
    rc = bts_main(["eval", "--harness", "--model", str(model), "--harness-tasks", "bts_uncached",
                   "--include-path", str(tasks), "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "is not in the local cache and the hub cannot be reached" in lines[0] and "--include-path" in lines[0]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", ["reproduce", "sweep", "eval", "data", "stitch-remove", "merge", "gates",
                                     "compare", "ceiling", "import-gguf"])
def test_project_command_usage_errors_are_one_line(command, capsys):
    """A misspelt option of any project command: one ``error: bts <command>: ...`` line and exit 2 (argparse's
    own multi-line usage dump is not printed), before any work starts."""
    assert bts_main([command, "--no-such-option", "1"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"error: bts {command}: ")
    assert "--no-such-option" in lines[0] or "arguments are required" in lines[0]  # argparse reports either first
    assert "usage:" not in captured.err + captured.out
