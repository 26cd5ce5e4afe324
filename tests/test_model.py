"""StitchedLM: placement, hub parity, KV-cached generation, frozen models, validation, gates, parameter counts."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from bts.core.io import BTSError
from bts.core.language_model import LanguageModel, greedy_or_sample_uncached
from bts.stitch.model import StitchConfig, StitchedLM, stitch_placement
from conftest import perturbed_copy, tiny_llama, tiny_qwen2


def _randomise_stitch(
    model: StitchedLM, seed: int = 0, gate_scale: float = 1.0, proj_noise: float = 0.0
) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.stitch_layers:
            w = layer.stitch_gate.weight
            w.copy_(torch.randn(w.shape, generator=g) * gate_scale)
            p = layer.stitch_proj
            p.add_(torch.randn(p.shape, generator=g) * proj_noise)


def _ids(b: int = 2, t: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


# --- placement ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layers,k,all_e2h,expected",
    [
        (8, 4, False, [(2, "h2e"), (4, "e2h"), (6, "h2e"), (8, "e2h")]),
        (20, 4, False, [(5, "h2e"), (10, "e2h"), (15, "h2e"), (20, "e2h")]),
        (8, 1, False, [(8, "e2h")]),
        (8, 3, False, [(3, "e2h"), (5, "h2e"), (8, "e2h")]),
        (10, 4, False, [(3, "h2e"), (5, "e2h"), (8, "h2e"), (10, "e2h")]),
        (28, 10, False, [(a, "e2h" if j % 2 else "h2e") for j, a in enumerate([3, 6, 8, 11, 14, 17, 20, 22, 25, 28])]),
        (4, 4, False, [(1, "h2e"), (2, "e2h"), (3, "h2e"), (4, "e2h")]),
        (8, 4, True, [(2, "e2h"), (4, "e2h"), (6, "e2h"), (8, "e2h")]),
        (20, 10, False, [(2 * j, "e2h" if j % 2 == 0 else "h2e") for j in range(1, 11)]),
    ],
)
def test_placement(layers, k, all_e2h, expected):
    got = stitch_placement(layers, StitchConfig(num_stitch_layers=k, all_e2h=all_e2h))
    assert got == expected
    assert got[-1][1] == "e2h"


@pytest.mark.parametrize("layers,k", [(L, K) for L in (8, 20, 28, 30) for K in (1, 2, 4, 10) if K <= L])
@pytest.mark.parametrize("all_e2h", [False, True])
def test_placement_last_stitch_after_final_layer(layers, k, all_e2h):
    # K > L is refused (test_placement_k_equals_l_and_errors)
    got = stitch_placement(layers, StitchConfig(num_stitch_layers=k, all_e2h=all_e2h))
    after = [a for a, _ in got]
    kinds = [kind for _, kind in got]
    assert len(got) == k
    assert after[-1] == layers  # the last stitch layer always follows the final transformer layer
    assert after[0] >= 1 and all(b > a for a, b in itertools.pairwise(after))  # strictly increasing, inside the stack
    assert after == [round_half_up((j + 1) * layers / k) for j in range(k)]  # evenly spread (documented rule)
    if all_e2h:
        assert kinds == ["e2h"] * k
    else:  # alternate, ending in E2H
        assert kinds[-1] == "e2h" and all(a != b for a, b in itertools.pairwise(kinds))


def round_half_up(x: float) -> int:
    return int(x + 0.5)  # the test's values (j+1)·L/K are exact multiples of 1/K, no float rounding issue here


def test_placement_k_equals_l_and_errors():
    got = stitch_placement(8, StitchConfig(num_stitch_layers=8))
    assert [a for a, _ in got] == list(range(1, 9)) and got[-1][1] == "e2h"
    assert [k for _, k in got] == ["h2e", "e2h"] * 4
    for k in (0, -1, 9):
        with pytest.raises(BTSError, match="num_stitch_layers"):
            stitch_placement(8, StitchConfig(num_stitch_layers=k))
    with pytest.raises(BTSError, match="num_stitch_layers=31 exceeds the models' 30 layers"):
        stitch_placement(30, StitchConfig(num_stitch_layers=31))


def test_model_placement_and_param_counts():
    hub = tiny_llama(0)
    model = StitchedLM(hub, [perturbed_copy(hub, s) for s in (1, 2, 3)], StitchConfig(num_stitch_layers=2))
    assert model.placement() == [(2, "h2e"), (4, "e2h")]
    assert [layer.kind for layer in model.stitch_layers] == ["h2e", "e2h"]
    pc = model.param_counts()
    d, n, k = 32, 3, 2
    assert pc.trained == k * (2 * n + 1) * d * d
    frozen = sum(p.numel() for m in model.models for p in m.parameters())
    assert pc.total == pc.active == pc.trained + frozen
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"stitch_layers.{j}.{name}" for j in range(2) for name in ("stitch_proj", "stitch_gate.weight")
    }
    assert isinstance(model, LanguageModel)
    with pytest.raises(BTSError):
        StitchedLM(hub, [perturbed_copy(hub, 1)], StitchConfig(num_stitch_layers=5))


# --- parity --------------------------------------------------------------------------------------------------------
def _qwen2_sliding(seed=0):
    m = tiny_qwen2(seed)
    cfg = copy.deepcopy(m.config)
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 4, 2
    cfg.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    out = Qwen2ForCausalLM(cfg).eval()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2_sliding"])
@pytest.mark.parametrize("k,all_e2h", [(4, False), (1, False), (2, True)])
def test_identical_experts_reproduce_hub_for_any_gates(family, k, all_e2h):
    hub = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen2_sliding": _qwen2_sliding}[family](0)
    experts = [copy.deepcopy(hub) for _ in range(2)]
    model = StitchedLM(hub, experts, StitchConfig(num_stitch_layers=k, all_e2h=all_e2h))
    _randomise_stitch(model, seed=k, gate_scale=3.0)  # identity projections, random gates
    x = _ids(t=11)
    with torch.no_grad():
        ref = hub(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(model.eval()(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.train()(x), ref, rtol=1e-4, atol=1e-4)  # gate dropout cannot matter


def test_non_identical_experts_change_output_and_hub_choice():
    hub = tiny_llama(0)
    a, b = perturbed_copy(hub, 1, 0.05), perturbed_copy(hub, 2, 0.05)
    x = _ids()
    with torch.no_grad():
        ref = hub(input_ids=x).logits
        out = StitchedLM(hub, [a, b]).eval()(x)
        assert not torch.allclose(out, ref, atol=1e-4)
        # an expert as hub: the output head is the expert's (two-model mode = 1 spoke)
        two = StitchedLM(a, [b], hub_name="a", expert_names=["b"]).eval()
        assert two.n_experts == 1 and two.names == ["a", "b"]
        assert two._parts[0].lm_head is a.lm_head and two._parts[0].norm is a.model.norm
        assert two(x).shape == (2, 9, 97)


# --- generation with KV caches -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2_sliding"])
def test_cached_forward_and_generation_equal_uncached(family):
    hub = tiny_llama(0) if family == "llama" else _qwen2_sliding(0)
    model = StitchedLM(hub, [perturbed_copy(hub, s, 0.05) for s in (1, 2)], StitchConfig(num_stitch_layers=2))
    _randomise_stitch(model, seed=3, gate_scale=0.5, proj_noise=0.05)
    model.eval()
    x = _ids(t=7)
    with torch.no_grad():
        full = model(torch.cat([x, _ids(t=5, seed=1)], 1))
        caches = model.new_caches()
        first = model(x, caches=caches)
        second = model(_ids(t=5, seed=1)[:, :2], caches=caches)
        third = model(_ids(t=5, seed=1)[:, 2:], caches=caches)
        torch.testing.assert_close(torch.cat([first, second, third], 1), full, rtol=1e-4, atol=1e-4)
    model.train()  # generate switches to eval and restores the mode
    greedy = model.generate(x, max_new_tokens=8)
    assert model.training and all(not m.training for m in model.models)
    assert greedy.shape == (2, 15) and torch.equal(greedy[:, :7], x)
    model.eval()
    assert torch.equal(greedy, greedy_or_sample_uncached(model, x, 8))
    s1 = model.generate(x, 8, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(5))
    s2 = greedy_or_sample_uncached(model, x, 8, None, True, 0.8, torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    eos = int(greedy[0, 8])
    stop = model.generate(x, 8, eos_token_id=eos)
    assert torch.equal(stop, greedy_or_sample_uncached(model, x, 8, eos_token_id=eos))
    assert torch.equal(model.generate(x, 0), x)


# --- frozen models -------------------------------------------------------------------------------------------------
def test_only_stitch_params_get_gradients_and_frozen_stay_eval():
    hub = tiny_llama(0)
    model = StitchedLM(hub, [perturbed_copy(hub, s) for s in (1, 2)], StitchConfig(num_stitch_layers=2))
    model.train()
    assert all(layer.training for layer in model.stitch_layers)
    assert all(not m.training for mod in model.models for m in mod.modules())
    loss = model(_ids()).logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("stitch_layers."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    model.eval()
    assert not any(layer.training for layer in model.stitch_layers)


# --- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,key",
    [({"d": 48}, "hidden_size"), ({"layers": 3}, "num_layers"), ({"vocab": 101}, "vocab_size")],
)
def test_mismatched_models_are_refused(kwargs, key):
    hub = tiny_llama(0)
    with pytest.raises(BTSError, match=rf"'math'.*{key}=\S+ but the hub 'seed' has {key}="):
        StitchedLM(
            hub,
            [perturbed_copy(hub, 1), tiny_llama(1, **kwargs)],
            hub_name="seed",
            expert_names=["code", "math"],
        )


def test_bad_model_sets_are_refused(tmp_path):
    hub = tiny_llama(0)
    with pytest.raises(BTSError, match="at least one expert"):
        StitchedLM(hub, [])
    e = perturbed_copy(hub, 1)
    with pytest.raises(BTSError, match="same model object"):
        StitchedLM(hub, [e, e])
    with pytest.raises(BTSError, match="same model object"):
        StitchedLM(hub, [hub])
    with pytest.raises(BTSError, match="unique"):
        StitchedLM(hub, [e, perturbed_copy(hub, 2)], expert_names=["x", "x"])
    hub.save_pretrained(tmp_path / "seed")
    with pytest.raises(BTSError, match="passed twice"):
        StitchedLM.from_pretrained_dirs(tmp_path / "seed", [tmp_path / "x" / ".." / "seed"])
    with pytest.raises(BTSError, match="init"):
        StitchConfig(init="xavier")


def test_from_pretrained_dirs(saved_llama_family, llama_family):
    seed_dir, dirs = saved_llama_family
    model = StitchedLM.from_pretrained_dirs(seed_dir, dirs[:2], num_stitch_layers=2, gate_dropout=0.0)
    assert model.names == ["seed", "expert0", "expert1"]
    assert model.sources == [str(seed_dir), str(dirs[0]), str(dirs[1])]
    assert model.config == StitchConfig(num_stitch_layers=2, gate_dropout=0.0)
    seed, experts = llama_family
    ref = StitchedLM(seed, experts[:2], model.config)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x))


# --- gates ---------------------------------------------------------------------------------------------------------
def test_record_gates():
    hub = tiny_llama(0)
    model = StitchedLM(hub, [perturbed_copy(hub, s) for s in (1, 2, 3)]).eval()  # K=4: 2 E2H layers
    x = _ids(t=6)
    with model.record_gates() as rec:
        model(x)
    assert rec.after_layers == [2, 4] and rec.names == model.names
    assert [tuple(g.shape) for g in rec.gates] == [(2, 6, 4), (2, 6, 4)]
    for g in rec.gates:  # identity init: uniform gates
        torch.testing.assert_close(g, torch.full_like(g, 0.25))
    _randomise_stitch(model, seed=1)
    with model.record_gates() as rec:
        model.generate(x, 3)
    assert [tuple(g.shape) for g in rec.gates] == [(2, 8, 4), (2, 8, 4)]  # prompt + 2 cached steps
    torch.testing.assert_close(rec.gates[0].sum(-1), torch.ones(2, 8))
    assert not all(torch.allclose(g, torch.full_like(g, 0.25)) for g in rec.gates)
    assert not any(layer.record_gates for layer in model.stitch_layers)
    all_e2h = StitchedLM(hub, [perturbed_copy(hub, 1)], StitchConfig(num_stitch_layers=4, all_e2h=True))
    with all_e2h.record_gates() as rec:
        all_e2h(x)
    assert len(rec.gates) == 4 and rec.after_layers == [1, 2, 3, 4]
