"""Stitch checkpoints: round trip, only stitch tensors saved, manifest, changed-model refusal and override."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from bts.core.io import BTSError, state_dict_sha256
from bts.dense.modeling import load_causal_lm
from bts.stitch.checkpoint import MANIFEST, WEIGHTS, load_stitched, save_stitched
from bts.stitch.model import StitchConfig, StitchedLM


def _trained(seed_dir, dirs, **cfg) -> StitchedLM:
    model = StitchedLM.from_pretrained_dirs(
        seed_dir, dirs, expert_names=["code", "math", "multilingual"][: len(dirs)], **cfg
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_round_trip_and_manifest(tmp_path, saved_llama_family):
    seed_dir, dirs = saved_llama_family
    model = _trained(seed_dir, dirs, num_stitch_layers=2, gate_dropout=0.2)
    out = save_stitched(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == sorted(["artifact.json", MANIFEST, WEIGHTS])
    assert json.loads((out / "artifact.json").read_text()) == {"kind": "bts"}
    with safe_open(str(out / WEIGHTS), "pt") as f:
        keys = sorted(f.keys())
    assert keys == [f"stitch_layers.{j}.{n}" for j in range(2) for n in ("stitch_gate.weight", "stitch_proj")]
    m = json.loads((out / MANIFEST).read_text())
    assert m["hub"]["name"] == "seed" and m["hub"]["role"] == "hub" and m["hub"]["path"] == str(seed_dir)
    assert [e["domain"] for e in m["experts"]] == ["code", "math", "multilingual"]
    assert [e["role"] for e in m["experts"]] == ["expert"] * 3
    assert m["hub"]["sha256"] == state_dict_sha256(load_causal_lm(seed_dir).state_dict())
    assert m["stitch_config"] == {
        "num_stitch_layers": 2,
        "all_e2h": False,
        "gate_dropout": 0.2,
        "init": "identity",
    }
    assert m["placement"] == [{"after_layer": 2, "kind": "h2e"}, {"after_layer": 4, "kind": "e2h"}]
    assert m["stitch_params"] == model.param_counts().trained

    loaded = load_stitched(out).eval()
    assert loaded.names == model.names and loaded.config == model.config
    assert loaded.allow_changed_models is False and loaded.changed_models == []
    x = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # already-loaded models can be passed in (hashes still checked)
    again = load_stitched(out, models=list(model.models))
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_changed_model_refused_and_override(tmp_path, saved_llama_family):
    seed_dir, dirs = saved_llama_family
    model = _trained(seed_dir, dirs[:2], num_stitch_layers=1)
    ckpt = save_stitched(model, tmp_path / "ckpt")
    changed = load_causal_lm(dirs[1])
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # one frozen weight
    changed.save_pretrained(dirs[1])
    with pytest.raises(BTSError, match=r"'math'.*changed") as err:
        load_stitched(ckpt)
    assert "code" not in str(err.value) and "\n" not in str(err.value)
    loaded = load_stitched(ckpt, allow_changed_models=True)
    assert loaded.allow_changed_models is True and loaded.changed_models == ["math"]
    # a re-save records that the stitch layers were trained with other weights
    save_stitched(loaded, tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / MANIFEST).read_text())["trained_with_changed_models"] == [
        "math"
    ]


def test_corrupt_or_missing_checkpoint(tmp_path, saved_llama_family):
    seed_dir, dirs = saved_llama_family
    with pytest.raises(BTSError, match="no bts.json"):
        load_stitched(tmp_path)
    model = _trained(seed_dir, dirs[:1], num_stitch_layers=1)
    ckpt = save_stitched(model, tmp_path / "ckpt")
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BTSError, match="sha256"):
        load_stitched(ckpt)
    with pytest.raises(BTSError, match="model_dirs"):
        save_stitched(
            StitchedLM(model.hub, model.experts, StitchConfig(num_stitch_layers=1)), tmp_path / "nosrc"
        )
        load_stitched(tmp_path / "nosrc")
    fine = load_stitched(tmp_path / "nosrc", model_dirs=[seed_dir, dirs[0]])
    assert fine.n_experts == 1
