"""The committed seed checkpoint (checkpoints/tiny_seed): hashes verified, changes refused, regeneration pinned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bts.core.io import BTSError
from bts.dense import pinned
from bts.pipeline.export import first_steps_fingerprint

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "tiny_seed"


def test_committed_seed_verifies_and_installs(tmp_path):
    digest = pinned.verify(CKPT)
    sums = pinned.read_sums(CKPT)
    assert "model.safetensors" in sums and "tokenizer.json" in sums and "training_config.yaml" in sums
    assert pinned.install(CKPT, tmp_path / "seed", tmp_path / "tok") == digest
    assert (tmp_path / "seed" / "model.safetensors").read_bytes() == (CKPT / "model.safetensors").read_bytes()
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and not (tmp_path / "tok" / "model.safetensors").exists()
    # the README names the regenerating command and every file's sha256
    readme = (CKPT / "README.md").read_text()
    assert "bts reproduce --profile seed_tiny" in readme and sums["model.safetensors"] in readme


def test_changed_or_missing_files_are_refused(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(CKPT, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BTSError, match="model.safetensors does not match its sha256"):
        pinned.verify(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(BTSError, match="model.safetensors is missing"):
        pinned.verify(copy)
    (copy / pinned.SUMS).unlink()
    with pytest.raises(BTSError, match="not a pinned checkpoint"):
        pinned.verify(copy)


def test_seed_is_converged_for_its_size():
    training = json.loads((CKPT / "training.json").read_text())
    assert training["tokens_seen"] / training["params"]["total"] >= 20  # DESIGN §7: >= 20 tokens per parameter


@pytest.mark.slow
def test_regeneration_is_deterministic_for_its_first_steps(tmp_path):
    """`bts reproduce --profile seed_tiny` regenerates the checkpoint: its first two steps (data, tokenizer, init,
    optimiser) must reproduce the fingerprint pinned beside the weights, and two runs must agree exactly."""
    pinned_fp = json.loads((CKPT / pinned.FIRST_STEPS).read_text())
    config = ROOT / pinned_fp["config"]
    a = first_steps_fingerprint(config, CKPT, tmp_path / "a", steps=pinned_fp["steps"])
    b = first_steps_fingerprint(config, CKPT, tmp_path / "b", steps=pinned_fp["steps"])
    assert a == b
    assert a["tensors"].keys() == pinned_fp["tensors"].keys()
    for name, (s, n) in pinned_fp["tensors"].items():
        assert a["tensors"][name][1] == pytest.approx(n, rel=1e-5), name
        assert a["tensors"][name][0] == pytest.approx(s, rel=1e-4, abs=1e-4), name
