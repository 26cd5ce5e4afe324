"""BAM (baselines.bam) and BAM with adapters (baselines.bam_adapters): dense equivalence, structure, parameter
counts, artifacts, frozen weights through real Lightning training."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.bam import BAMModel, BAMModule, build_bam, load_bam
from baselines.bam_adapters import BAMAdaptersModel, BAMAdaptersModule, load_bam_adapters
from baselines.btx import build_btx
from baselines.moe import AttentionMixture
from bts.core.io import state_dict_sha256
from bts.core.params import count_params
from conftest import fit_random_batches, perturbed_copy, tiny_llama


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


# --- BAM -----------------------------------------------------------------------------------------------------------
def test_bam_with_identical_models_equals_dense(ids):
    seed = tiny_llama(0)
    dense = seed(input_ids=ids).logits
    same = [perturbed_copy(seed, 1, scale=0.0) for _ in range(2)]
    bam = build_bam(seed, same, router_init_std=0.5)
    torch.testing.assert_close(bam.eval()(ids), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(bam.train()(ids), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(build_bam(seed, []).eval()(ids), dense, atol=1e-5, rtol=0)


def test_bam_structure_and_param_counts(llama_family, ids):
    seed, experts = llama_family
    models = [seed, *experts]
    bam = build_bam(seed, experts)
    layer = bam.model.model.layers[1]
    assert isinstance(layer.self_attn, AttentionMixture) and layer.self_attn.num_experts == 4
    for m, attn in zip(models, layer.self_attn.experts):  # each model's own attention weights
        assert torch.equal(attn.q_proj.weight, m.model.layers[1].self_attn.q_proj.weight)
    hand = sum(m.model.layers[1].input_layernorm.weight.double() for m in models) / 4
    torch.testing.assert_close(layer.input_layernorm.weight.double(), hand, atol=1e-7, rtol=0)
    # BAM = BTX-soft + (E - 1) more attentions per layer + attention routers
    btx = build_btx(seed, experts, "soft")
    attn = count_params(seed.model.layers[0].self_attn)
    counts = bam.param_counts()
    assert counts.total == btx.param_counts().total + 4 * (3 * attn + 32 * 4) == count_params(bam)
    assert counts.trained == counts.active == counts.total
    # the mixture really differs from BTX-soft (attention experts are not averaged)
    assert not torch.allclose(
        bam.eval()(ids), build_btx(seed, experts, "soft", router_init_std=0.02).eval()(ids)
    )


def test_bam_artifact_roundtrip(llama_family, ids, tmp_path):
    seed, experts = llama_family
    bam = build_bam(seed, experts, router_init_std=0.3).eval()
    bam.save(tmp_path)
    meta = json.loads((tmp_path / "bam.json").read_text())
    assert meta["format"] == "safetensors" and "attention experts" in meta["why_not_mixtral"]
    loaded = load_bam(tmp_path)
    assert isinstance(loaded, BAMModel)
    assert loaded.param_counts() == bam.param_counts()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), bam(ids), atol=0, rtol=0)


def test_bam_module_trains_every_parameter(saved_llama_family, tmp_path):
    seed_dir, expert_dirs = saved_llama_family
    module = BAMModule(
        str(seed_dir),
        [str(d) for d in expert_dirs],
        lr=1e-2,
        warmup_steps=0,
        output_dir=str(tmp_path / "bam"),
    )
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    fit_random_batches(module, steps=2)
    after = module.net.state_dict()
    for key in [
        "model.model.layers.0.self_attn.router.weight",
        "model.model.layers.0.self_attn.experts.2.k_proj.weight",
        "model.model.layers.3.mlp.router.weight",
        "model.lm_head.weight",
    ]:
        assert not torch.equal(before[key], after[key]), key
    assert (tmp_path / "bam" / "bam.safetensors").is_file()
    assert (
        json.loads((tmp_path / "bam" / "training.json").read_text())["params"]
        == module.param_counts().to_dict()
    )


# --- BAM with adapters ---------------------------------------------------------------------------------------------
def test_bam_adapters_identity_with_identical_models_equals_dense(ids):
    seed = tiny_llama(0)
    dense = seed(input_ids=ids).logits
    net = BAMAdaptersModel(
        [seed, perturbed_copy(seed, 1, scale=0.0), perturbed_copy(seed, 2, scale=0.0)], router_init_std=0.5
    )
    torch.testing.assert_close(net(ids), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(BAMAdaptersModel([seed])(ids), dense, atol=1e-5, rtol=0)


def test_bam_adapters_param_counts(llama_family):
    seed, experts = llama_family
    net = BAMAdaptersModel([seed, *experts])
    n_layers, d, m = 4, 32, 4
    trained = n_layers * (2 * m * d * d + 2 * d * m)
    layer = count_params(seed.model.layers[0])
    frozen = (
        m * n_layers * layer
        + count_params(seed.model.embed_tokens)
        + count_params(seed.model.norm)
        + count_params(seed.lm_head)
    )
    counts = net.param_counts()
    assert counts.trained == trained
    assert counts.total == counts.active == trained + frozen


def test_bam_adapters_frozen_weights_bit_identical_after_training(saved_llama_family, tmp_path, ids):
    seed_dir, expert_dirs = saved_llama_family
    module = BAMAdaptersModule(
        str(seed_dir),
        [str(d) for d in expert_dirs],
        router_init_std=0.1,
        lr=1e-2,
        warmup_steps=0,
        output_dir=str(tmp_path / "bam_adapters"),
    )
    net = module.net
    frozen = {n: p for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("embed_tokens", "norm", "lm_head", "model_layers")) for n in frozen)
    frozen_sha = state_dict_sha256(frozen)
    trainable_before = {k: v.clone() for k, v in net.trainable_state().items()}
    fit_random_batches(module, steps=3)
    assert state_dict_sha256({n: p for n, p in net.named_parameters() if not p.requires_grad}) == frozen_sha
    assert all(not m.training for m in net.frozen_modules())
    after = net.trainable_state()
    assert not torch.equal(trainable_before["attn_adapters.0.1.weight"], after["attn_adapters.0.1.weight"])
    assert not torch.equal(trainable_before["ffn_routers.3.weight"], after["ffn_routers.3.weight"])
    # artifact: only routers/adapters are stored, the frozen models are re-read from their directories
    out = tmp_path / "bam_adapters"
    assert json.loads((out / "bam_adapters.json").read_text())["seed"] == str(seed_dir)
    loaded = load_bam_adapters(out)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), net(ids), atol=0, rtol=0)
