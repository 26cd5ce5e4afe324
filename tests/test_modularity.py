"""Removing / adding experts of a trained BTS model, in memory and with `bts stitch-remove`."""

from __future__ import annotations

import json

import pytest
import torch

from bts.cli.main import main as bts_main
from bts.core.io import BTSError
from bts.stitch.checkpoint import MANIFEST, load_stitched, save_stitched
from bts.stitch.model import StitchConfig, StitchedLM
from bts.stitch.modularity import add_expert, new_slice_masks, remove_expert
from conftest import perturbed_copy, tiny_llama

NAMES = ["code", "math", "multilingual"]


def _trained(hub, experts, names=NAMES, k=4) -> StitchedLM:
    model = StitchedLM(hub, experts, StitchConfig(num_stitch_layers=k), hub_name="seed", expert_names=names)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _x():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def test_remove_expert_equals_model_with_kept_slices(llama_family):
    seed, experts = llama_family
    model = _trained(seed, experts)
    small = remove_expert(model, "math")
    assert small.n_experts == 2 and small.names == ["seed", "code", "multilingual"]
    assert small.experts[0] is experts[0] and small.experts[1] is experts[2]
    # independent reference: a model built from the survivors, slices kept by explicit indexing
    ref = StitchedLM(
        seed, [experts[0], experts[2]], model.config, hub_name="seed", expert_names=["code", "multilingual"]
    )
    d = 32
    with torch.no_grad():
        for src, dst in zip(model.stitch_layers, ref.stitch_layers):
            dst.stitch_proj.copy_(src.stitch_proj[[0, 2]])
            dst.stitch_gate.weight.copy_(src.stitch_gate.weight.view(d, 4, d)[:, [0, 1, 3]].reshape(3 * d, d))
    ref.eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(small(x), ref(x))
        assert not torch.allclose(small(x), model(x))
    assert small.param_counts().trained == 4 * 5 * d * d
    tiny = remove_expert(small, "code")
    assert tiny.expert_names == ["multilingual"]
    with pytest.raises(BTSError, match="only expert"):
        remove_expert(tiny, "multilingual")
    with pytest.raises(BTSError, match="hub"):
        remove_expert(model, "seed")
    with pytest.raises(BTSError, match="no expert named"):
        remove_expert(model, "law")


def test_add_then_remove_round_trip(llama_family):
    seed, experts = llama_family
    model = _trained(seed, experts[:2], names=NAMES[:2])
    bigger = add_expert(model, experts[2], "multilingual")
    assert bigger.names == ["seed", *NAMES]
    for old, new in zip(model.stitch_layers, bigger.stitch_layers):
        assert torch.equal(new.stitch_proj[:2], old.stitch_proj)
        assert torch.equal(new.stitch_proj[2], torch.eye(32))
        for i in range(3):
            assert torch.equal(new.gate_rows(i), old.gate_rows(i))
        assert not new.gate_rows(3).any()
    back = remove_expert(bigger, "multilingual")
    for a, b in zip(back.stitch_state_dict().values(), model.stitch_state_dict().values()):
        assert torch.equal(a, b)
    masks = new_slice_masks(bigger, ["multilingual"])
    assert set(masks) == {n for n, _ in bigger.named_parameters() if n.startswith("stitch_layers.")}
    assert sum(int(m.sum()) for m in masks.values()) == 4 * 2 * 32 * 32
    with pytest.raises(BTSError, match="already"):
        add_expert(model, perturbed_copy(seed, 9), "code")
    with pytest.raises(BTSError, match="hidden_size"):
        add_expert(model, tiny_llama(0, d=48), "law")


def test_stitch_remove_cli(tmp_path, saved_llama_family, capsys):
    seed_dir, dirs = saved_llama_family
    model = StitchedLM.from_pretrained_dirs(seed_dir, dirs, expert_names=NAMES, num_stitch_layers=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_stitched(model, tmp_path / "bts")
    assert bts_main(["stitch-remove", "--ckpt", str(tmp_path / "bts"), "--expert", "multilingual",
                     "--out", str(tmp_path / "rm")]) == 0
    manifest = json.loads((tmp_path / "rm" / MANIFEST).read_text())
    assert [e["name"] for e in manifest["experts"]] == ["code", "math"]
    assert manifest["derived_from"]["removed"] == "multilingual"
    loaded = load_stitched(tmp_path / "rm").eval()  # hashes of the surviving models still verified
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), remove_expert(model.eval(), "multilingual")(x))

    capsys.readouterr()
    for argv, msg in [
        (["--expert", "law"], "no expert named 'law'"),
        (["--expert", "seed"], "is the hub"),
    ]:
        assert bts_main(["stitch-remove", "--ckpt", str(tmp_path / "bts"), "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert bts_main(["stitch-remove", "--ckpt", str(tmp_path / "nothing"), "--expert", "code",
                     "--out", str(tmp_path / "x")]) == 2
    assert "not a BTS stitch checkpoint" in capsys.readouterr().err
    # help wins over a bad checkpoint path
    assert bts_main(["stitch-remove", "--help", "--ckpt", str(tmp_path / "nothing")]) == 0
    assert capsys.readouterr().err == ""
