"""Artifacts respect the umask: a trained model directory, its training.json and an eval.json get the modes a plain
open/mkdir would give (0755/0644 under umask 022, 0700/0600 under 077), although they are written through private
temporary files and directories (mkstemp/mkdtemp) and renamed into place."""

from __future__ import annotations

import json
import os
import stat

import pytest

import tiny_fit as tf
from bts.cli.main import main as bts_main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("umask")
    return root, tf.write_corpus(root / "corpus", n=60), tf.write_tokenizer(root / "tok")


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_trained_model_and_eval_json_follow_the_umask(inputs, tmp_path, umask, mask, capsys):
    root, sources, tok = inputs
    umask(mask)
    model = {"class_path": "bts.dense.module.CausalLMModule",
             "init_args": {"arch": {"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                                    "num_hidden_layers": 1}, "output_dir": str(tmp_path / "seed")}}
    cfg = tf.write_config(tmp_path / "c.yaml", model, tf.data_config(tmp_path, root / "tok", sources),
                          tf.trainer_config(tmp_path, max_steps=1))
    assert bts_main(["fit", "--config", str(cfg)]) == 0, capsys.readouterr().err[-2000:]
    out = tmp_path / "seed"
    assert _mode(out) == 0o777 & ~mask
    for name in ("training.json", "config.json", "model.safetensors", "tokenizer.json"):
        assert _mode(out / name) == 0o666 & ~mask, name
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"domain": "general", "text": t}) + "\n" for t in tf.texts("general", 8)))
    rc = bts_main(["eval", "--model", str(out), "--tasks", "ppl", "--data", str(data), "--set", "ppl_blocks=1",
                   "--set", "ppl_domains=general", "--seq-len", "16", "--no-progress", "--out",
                   str(tmp_path / "eval.json")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert _mode(tmp_path / "eval.json") == 0o666 & ~mask
