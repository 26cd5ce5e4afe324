"""BTX (baselines.btx): upcycling math, routing variants, Mixtral export, load balancing, parameter counts,
training through the shared Lightning loop."""

from __future__ import annotations

import json

import pytest
import torch

from baselines.btx import BTXModel, BTXModule, build_btx, export_mixtral, load_btx
from baselines.moe import MoEFFN
from bts.core.io import state_dict_sha256
from bts.core.params import count_params
from conftest import fit_random_batches, perturbed_copy, tiny_llama, tiny_qwen2

VARIANTS = ["sample", "soft", "top2"]


@pytest.fixture
def ids():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_expert_and_identical_copies_equal_dense(variant, ids):
    seed = tiny_llama(0)
    dense = seed(input_ids=ids).logits
    alone = build_btx(seed, [], variant).eval()
    assert alone.num_experts == 1
    torch.testing.assert_close(alone(ids), dense, atol=1e-5, rtol=0)
    copies = build_btx(seed, [perturbed_copy(seed, 1, scale=0.0)] * 2, variant, router_init_std=0.5)
    torch.testing.assert_close(copies.eval()(ids), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        copies.train()(ids), dense, atol=1e-5, rtol=0
    )  # Gumbel / top-k in training too


def test_non_ffn_params_are_the_mean_and_ffns_the_sources(llama_family):
    seed, experts = llama_family
    before = [state_dict_sha256(m.state_dict()) for m in (seed, *experts)]
    btx = build_btx(seed, experts, "top2")
    models = [seed, *experts]
    for name in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        hand = sum(m.get_parameter(name).double() for m in models) / len(models)
        torch.testing.assert_close(btx.model.get_parameter(name).double(), hand, atol=1e-7, rtol=0)
        assert not torch.equal(btx.model.get_parameter(name), seed.get_parameter(name))
    moe = btx.model.model.layers[2].mlp
    assert isinstance(moe, MoEFFN) and moe.num_experts == 4
    for e, m in enumerate(models):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(
                getattr(moe.experts[e], proj).weight, getattr(m.model.layers[2].mlp, proj).weight
            )
    assert [state_dict_sha256(m.state_dict()) for m in models] == before  # sources untouched
    assert all(p.requires_grad for p in btx.parameters())


@pytest.mark.parametrize("variant,k", [("top2", 2), ("soft", 4), ("sample", 1)])
def test_mixtral_export_roundtrip(variant, k, llama_family, ids, tmp_path):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    seed, experts = llama_family
    btx = build_btx(seed, experts, variant, router_init_std=0.5).eval()
    export_mixtral(btx, tmp_path / "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert isinstance(hf, MixtralForCausalLM)
    assert hf.config.num_local_experts == 4 and hf.config.num_experts_per_tok == k
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, btx(ids), atol=1e-5, rtol=0)
    # the full artifact (btx.json + Mixtral dir) reloads through load_btx with the same counts
    btx.save(tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "btx.json").read_text())
    assert meta["format"] == "mixtral" and meta["variant"] == variant
    loaded = load_btx(tmp_path / "art")
    assert loaded.param_counts() == btx.param_counts()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), btx(ids), atol=1e-5, rtol=0)


def test_top2_load_balancing_loss_matches_hand_recomputation(llama_family, ids):
    seed, experts = llama_family
    btx = build_btx(seed, experts, "top2", router_init_std=0.5, load_balance_coef=0.01).train()
    inputs = []
    hooks = [
        m.register_forward_hook(lambda mod, a, out: inputs.append((mod, a[0]))) for m in btx.moe_layers()
    ]
    btx(ids)
    for h in hooks:
        h.remove()
    per_layer = []
    for moe, x in inputs:
        x = x.reshape(-1, x.shape[-1]).double()
        w = moe.router.weight.double()
        counts, prob_sum = [0.0] * 4, [0.0] * 4
        for row in x:
            logits = [float(w[e] @ row) for e in range(4)]
            mx = max(logits)
            z = sum(torch.exp(torch.tensor(v - mx)).item() for v in logits)
            probs = [torch.exp(torch.tensor(v - mx)).item() / z for v in logits]
            for e in sorted(range(4), key=lambda e: -probs[e])[:2]:
                counts[e] += 1
            for e in range(4):
                prob_sum[e] += probs[e]
        n = x.shape[0]
        per_layer.append(4 * sum((counts[e] / (2 * n)) * (prob_sum[e] / n) for e in range(4)))
    hand = 0.01 * sum(per_layer) / len(per_layer)
    assert btx.aux_loss().item() == pytest.approx(hand, rel=1e-5)
    assert build_btx(seed, experts, "soft").aux_loss() is None


def test_top2_weights_follow_mixtral_renormalisation():
    torch.manual_seed(0)
    moe = MoEFFN([torch.nn.Identity()] * 3, hidden_size=4, routing="topk", top_k=2)
    logits = torch.tensor([[2.0, 0.0, 1.0]])
    w, idx = moe.route(logits)
    p = torch.softmax(logits, -1)[0]
    assert idx.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.stack([p[0], p[2]])[None] / (p[0] + p[2]))


def test_sample_is_straight_through_top1(llama_family, ids):
    seed, experts = llama_family
    btx = build_btx(seed, experts, "sample", router_init_std=0.5).train()
    torch.manual_seed(0)
    btx(ids).float().pow(2).mean().backward()
    moe = btx.moe_layers()[1]
    assert moe.last_top_k_index.shape == (ids.numel(), 1)
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    w, _ = moe.route(torch.randn(5, 4))
    assert torch.equal(w.detach(), torch.ones(5, 1))
    btx.eval()
    _, idx = moe.route(torch.tensor([[0.1, 3.0, -1.0, 0.0]]))
    assert idx.tolist() == [[1]]  # argmax at evaluation


def _chi2_pvalue(index: torch.Tensor, probs: torch.Tensor, groups: torch.Tensor | None = None) -> float:
    """Pearson chi-square goodness of fit of the chosen experts ``index [N]`` to per-token probabilities ``probs
    [N, E]`` (or one row ``[E]`` shared by every token). Tokens are split into ``groups [N]`` (default: one group);
    in each group the observed count of expert ``e`` is compared with ``sum_tokens p_e``. Cells expecting fewer
    than 5 tokens are left out; degrees of freedom = cells used - groups."""
    from scipy.stats import chi2

    index = index.reshape(-1)
    probs = probs.double().expand(index.numel(), -1)
    groups = torch.zeros_like(index) if groups is None else groups.reshape(-1)
    stat, cells, n_groups = 0.0, 0, 0
    for gid in groups.unique():
        sel = groups == gid
        observed = torch.bincount(index[sel], minlength=probs.shape[1]).double()
        expected = probs[sel].sum(0)
        keep = expected >= 5
        stat += float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
        cells, n_groups = cells + int(keep.sum()), n_groups + 1
    return float(chi2.sf(stat, max(cells - n_groups, 1)))


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_sample_frequencies_follow_router_softmax(temperature):
    """Gumbel top-1 in training picks expert ``e`` with probability ``softmax(logits)_e`` (the Gumbel-max trick; the
    temperature only shapes the gradient). A plain argmax fails the same test."""
    moe = MoEFFN([torch.nn.Identity()] * 4, hidden_size=4, routing="gumbel", temperature=temperature).train()
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7]).expand(20_000, 4)
    probs = torch.softmax(logits[0], -1)
    torch.manual_seed(0)
    _, index = moe.route(logits)
    assert index.shape == (20_000, 1)
    assert _chi2_pvalue(index, probs) > 1e-3
    freq = torch.bincount(index.reshape(-1), minlength=4).double() / 20_000
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)
    moe.eval()  # evaluation routing is the argmax: it must fail the goodness of fit
    _, argmax_index = moe.route(logits)
    assert _chi2_pvalue(argmax_index, probs) < 1e-12


def test_btx_sample_model_frequencies_follow_router_softmax(llama_family):
    """In a BTX "sample" model (train mode), every layer's chosen experts over many tokens fit the router's
    per-token softmax: tokens are grouped by their most likely expert and, in each group, the count of expert ``e``
    is compared with ``sum_tokens p_e`` (Pearson chi-square). The argmax of the same router logits is rejected."""
    seed, experts = llama_family
    btx = build_btx(seed, experts, "sample", router_init_std=0.5).train()
    ids = torch.randint(0, 97, (16, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    with torch.no_grad():
        btx(ids)
    for moe in btx.moe_layers():
        logits, index = moe.last_router_logits, moe.last_top_k_index
        assert index.shape == (ids.numel(), 1)
        probs = torch.softmax(logits.float(), -1)
        top = probs.argmax(-1)
        assert _chi2_pvalue(index, probs, groups=top) > 1e-3
        assert _chi2_pvalue(top, probs, groups=top) < 1e-12


@pytest.mark.parametrize("variant", VARIANTS)
def test_param_counts(variant, llama_family):
    seed, experts = llama_family
    btx = build_btx(seed, experts, variant)
    n_layers, d, e = 4, 32, 4
    ffn = count_params(seed.model.layers[0].mlp)
    shared = count_params(seed) - n_layers * ffn
    routers = n_layers * d * e
    counts = btx.param_counts()
    assert counts.total == shared + e * n_layers * ffn + routers == count_params(btx)
    assert counts.trained == counts.total
    k = {"sample": 1, "soft": 4, "top2": 2}[variant]
    assert counts.active == shared + k * n_layers * ffn + routers


def test_non_llama_falls_back_to_safetensors(ids, tmp_path):
    q = tiny_qwen2(0)
    btx = build_btx(q, [perturbed_copy(q, 1)], "top2", router_init_std=0.5).eval()
    assert btx.mixtral_export_problem() is not None  # Qwen2 has attention biases
    btx.save(tmp_path)
    meta = json.loads((tmp_path / "btx.json").read_text())
    assert meta["format"] == "safetensors" and not (tmp_path / "config.json").exists()
    loaded = load_btx(tmp_path)
    assert isinstance(loaded, BTXModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), btx(ids), atol=0, rtol=0)


def test_btx_module_trains_all_params_and_exports(saved_llama_family, tmp_path):
    seed_dir, expert_dirs = saved_llama_family
    out = tmp_path / "btx_top2"
    module = BTXModule(
        str(seed_dir),
        [str(d) for d in expert_dirs],
        variant="top2",
        lr=1e-2,
        warmup_steps=0,
        output_dir=str(out),
    )
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    fit_random_batches(module, steps=2)
    after = module.net.state_dict()
    assert not torch.equal(
        before["model.model.layers.0.mlp.router.weight"], after["model.model.layers.0.mlp.router.weight"]
    )
    assert not torch.equal(
        before["model.model.layers.0.mlp.experts.1.up_proj.weight"],
        after["model.model.layers.0.mlp.experts.1.up_proj.weight"],
    )
    assert not torch.equal(
        before["model.model.embed_tokens.weight"], after["model.model.embed_tokens.weight"]
    )
    training = json.loads((out / "training.json").read_text())
    assert training["params"] == module.param_counts().to_dict()
    assert training["global_step"] == 2
    assert json.loads((out / "btx.json").read_text())["experts"] == [str(d) for d in expert_dirs]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 97, (1, 10))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, module(ids), atol=1e-5, rtol=0)
