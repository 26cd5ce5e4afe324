"""Multiple choice from packed rows (``EvalConfig.mc_shared_prefix``, ``bts.core.tree_attention``): every method that
supports it scores each candidate as on the candidate's own row, up to float32 round-off; the others fall back."""

from __future__ import annotations

import random
import types

import pytest
import torch

from baselines.bam import build_bam
from baselines.bam_adapters import BAMAdaptersModel
from baselines.btm import BTMEnsemble
from baselines.btx import build_btx
from baselines.expert_routing import ExpertRouter
from baselines.upcycle import MixtralLM
from bts.core import tree_attention
from bts.core.language_model import HFLanguageModel
from bts.core.tree_attention import TreeRows
from bts.eval.config import EvalConfig
from bts.eval.tasks.base import Context
from bts.eval.tasks.scoring import MCItem, run_mc, score_mc
from bts.stitch.model import StitchConfig, StitchedLM
from conftest import perturbed_copy, tiny_llama, tiny_qwen2

VOCAB = 97
TOKENIZER = types.SimpleNamespace(eos_token_id=2, bos_token_id=1)


def _items(n: int = 9, seed: int = 0) -> list[MCItem]:
    """Items with contexts of 3-20 tokens and 2-4 candidates of 1-6 tokens (some longer than others)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        cands = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(k)]
        out.append(MCItem([rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 20))], ["x"] * k, cands,
                          rng.randrange(k)))
    return out


def _ctx(model, shared: bool, batch_tokens: int = 64, max_context: int = 24) -> Context:
    cfg = EvalConfig(mc_shared_prefix=shared, mc_batch_tokens=batch_tokens, max_context=max_context)
    return Context(model, TOKENIZER, cfg, 24, False, lambda domain: [])


def _flat(scores: list[list[float]]) -> torch.Tensor:
    return torch.tensor([v for row in scores for v in row], dtype=torch.float64)


def _randomise(module: torch.nn.Module, seed: int, scale: float) -> None:
    """Non-trivial trained parameters (routers, gates, adapters): seeded noise on every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _family(qwen: bool = False):
    seed = tiny_qwen2(0) if qwen else tiny_llama(0)
    return seed, [perturbed_copy(seed, s, 0.05) for s in (1, 2, 3)]


def _stitched():
    seed, experts = _family()
    model = StitchedLM(seed, experts, StitchConfig(num_stitch_layers=2))
    _randomise(model, 3, 0.3)
    return model


def _btx(variant):
    seed, experts = _family()
    return build_btx(seed, experts, variant, router_init_std=0.5)


def _bam():
    seed, experts = _family()
    return build_bam(seed, experts, router_init_std=0.5)


def _bam_adapters():
    seed, experts = _family()
    model = BAMAdaptersModel([seed, *experts], router_init_std=0.5)
    _randomise(model, 4, 0.05)
    return model


MODELS = {
    "dense_llama": lambda: HFLanguageModel(_family()[0]),
    "dense_qwen2": lambda: HFLanguageModel(_family(qwen=True)[0]),  # attention biases, GQA 4/2
    "bts": _stitched,
    "btm": lambda: BTMEnsemble([_family()[0], *_family()[1]]),
    "btx_soft": lambda: _btx("soft"),
    "btx_top2": lambda: _btx("top2"),
    "btx_sample": lambda: _btx("sample"),
    "bam": _bam,
    "bam_mixtral": lambda: MixtralLM(_btx("top2").to_mixtral()),
    "bam_adapters": _bam_adapters,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_packed_rows_score_as_one_row_per_candidate(name):
    model = MODELS[name]().eval()
    items = _items()
    assert tree_attention.model_supports(model)
    with torch.no_grad():
        one_per_candidate = score_mc(_ctx(model, shared=False), items)
        packed = score_mc(_ctx(model, shared=True), items)
        small_batches = score_mc(_ctx(model, shared=True, batch_tokens=1), items)  # one item per pass, no padding
    torch.testing.assert_close(_flat(packed), _flat(one_per_candidate), rtol=0, atol=2e-4)
    torch.testing.assert_close(_flat(small_batches), _flat(one_per_candidate), rtol=0, atol=2e-4)
    # the candidates are told apart: the scores are not all one value (the comparison above is not vacuous)
    assert _flat(packed).std() > 0.5


def test_packed_rows_are_used_and_recorded():
    model = MODELS["dense_llama"]().eval()
    calls = []
    forward_tree = model.forward_tree
    model.forward_tree = lambda x, tree: calls.append(x.shape) or forward_tree(x, tree)
    with torch.no_grad():
        out = run_mc(_ctx(model, shared=True), "math_mc_acc", _items())
    # 9 items packed into rows of at most 64 tokens (padding included): fewer passes than items
    assert calls and sum(s[0] for s in calls) == 9 and all(s[0] * s[1] <= 64 or s[0] == 1 for s in calls)
    assert out.formats["mc_scoring"].startswith("shared prefix")
    with torch.no_grad():
        assert run_mc(_ctx(model, shared=False), "math_mc_acc", _items()).formats["mc_scoring"] == (
            "one row per candidate")


def test_expert_routing_falls_back_to_one_row_per_candidate():
    seed, experts = _family()
    router = ExpertRouter([seed, *experts], route_prefix=4, router_init_std=1.0).eval()
    assert not tree_attention.model_supports(router)
    items = _items()
    with torch.no_grad():
        assert score_mc(_ctx(router, shared=True), items) == score_mc(_ctx(router, shared=False), items)
        assert run_mc(_ctx(router, shared=True), "math_mc_acc", items).formats["mc_scoring"] == (
            "one row per candidate")


def test_eager_attention_gets_an_additive_mask():
    seed = tiny_llama(0)
    seed.config._attn_implementation = "eager"
    model = HFLanguageModel(seed).eval()
    items = _items(seed=1)
    with torch.no_grad():
        a = score_mc(_ctx(model, shared=True), items)
        b = score_mc(_ctx(model, shared=False), items)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=2e-4)


def test_unsupported_attention_is_not_packed():
    from transformers import Qwen2ForCausalLM

    sliding = tiny_qwen2(0).config
    sliding.use_sliding_window, sliding.sliding_window, sliding.max_window_layers = True, 4, 2
    sliding.layer_types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert not HFLanguageModel(Qwen2ForCausalLM(sliding)).supports_tree_attention()
    flash = tiny_llama(0)
    flash.config._attn_implementation = "flash_attention_2"
    assert not HFLanguageModel(flash).supports_tree_attention()
    with pytest.raises(ValueError, match="sdpa or eager"):
        TreeRows(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.bool)).attention_mask(
            flash.config, torch.float32)


def test_predecessors_follow_the_tree():
    # context of 3 tokens (0-2), candidate A at 3-4, candidate B at 5-7, one padding position (8)
    v = torch.zeros(9, 9, dtype=torch.bool)
    v[:3, :3] = torch.ones(3, 3).tril().bool()
    v[3:5, :3] = v[5:8, :3] = True
    v[3:5, 3:5] = torch.ones(2, 2).tril().bool()
    v[5:8, 5:8] = torch.ones(3, 3).tril().bool()
    v[8, 8] = True
    tree = TreeRows(torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5, 0]]), v[None])
    assert tree.predecessors().tolist() == [[-1, 0, 1, 2, 3, 2, 5, 6, -1]]
    # the same layout from segment ids (padding also sees the context there; no real position sees padding)
    built = TreeRows.from_segments(tree.position_ids, torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1]]))
    assert torch.equal(built.visible[0, :8], v[:8]) and not built.visible[0, :8, 8].any()
    assert built.predecessors()[0, :8].tolist() == [-1, 0, 1, 2, 3, 2, 5, 6]
