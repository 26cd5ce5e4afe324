"""bts.training.flops against torch.utils.flop_counter, which counts the matmuls a step actually runs (eager attention, so
that Q·K^T and A·V are counted as the bmm they are): a dense forward, a dense training step, a training step with a
frozen head, and the BTS step (only the backward the stitch gradients need)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bts.stitch.model import StitchConfig, StitchedLM
from bts.training import flops
from bts.training.losses import linear_cross_entropy
from conftest import perturbed_copy, tiny_llama

B, T = 2, 16


def _eager(model):
    model.config._attn_implementation = "eager"
    return model


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _ids(vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))


def test_dense_forward_and_training_step_match_the_flop_counter():
    model = _eager(tiny_llama(0, layers=3)).train()
    x = _ids()
    assert _count(lambda: model(input_ids=x, use_cache=False).logits) == flops.dense_forward_flops(
        model.config, T) * B * T

    def step():
        model(input_ids=x, use_cache=False).logits.float().logsumexp(-1).sum().backward()

    assert _count(step) == flops.dense_train_flops(model.config, T) * B * T


def test_frozen_head_drops_its_weight_gradient():
    from bts.dense.module import CausalLMModule

    module = CausalLMModule.__new__(CausalLMModule)  # flops_per_token needs only .model
    torch.nn.Module.__init__(module)
    module.model = _eager(tiny_llama(0, layers=2)).train()
    module.model.lm_head.weight.requires_grad_(False)
    x = _ids()

    def step():
        hidden = module.model.model(input_ids=x, use_cache=False).last_hidden_state
        linear_cross_entropy(hidden[:, :-1].flatten(0, 1), module.model.lm_head, x[:, 1:].flatten()).backward()

    counted = _count(step)
    # the loss scores T-1 positions per row; the formula is per token of the full row
    per_token = module.flops_per_token(T)
    head = flops.head_forward_flops(module.model.config)
    assert counted == per_token * B * T - 2 * head * B  # two head matmuls (forward, input grad) not run at T


@pytest.mark.parametrize("k", [1, 2, 4])
def test_bts_step_matches_the_flop_counter(k):
    hub = _eager(tiny_llama(0, layers=4))
    experts = [_eager(perturbed_copy(hub, s, 0.05)) for s in (1, 2)]
    model = StitchedLM(hub, experts, StitchConfig(num_stitch_layers=k, gate_dropout=0.0)).train()
    x = _ids()

    def step():
        hidden = model.hidden_states(x)
        linear_cross_entropy(hidden.flatten(0, 1), model.output_head, x.flatten()).backward()

    expected = flops.stitched_train_flops(hub.config, 2, model.placement(), T) * B * T
    assert _count(step) == expected
    # the frozen models got no gradient: the count above holds no weight gradient of theirs
    assert all(p.grad is None for m in model.models for p in m.parameters())


def test_stitched_forward_counts_one_head():
    hub = _eager(tiny_llama(0, layers=4))
    model = StitchedLM(hub, [_eager(copy.deepcopy(hub))], StitchConfig(num_stitch_layers=2)).eval()
    x = _ids()
    with torch.no_grad():
        counted = _count(lambda: model(x))
    assert counted == flops.stitched_forward_flops(hub.config, 1, 2, T) * B * T


def _module_step_count(module, x) -> int:
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
    module.train()
    return _count(lambda: module.lm_loss(x).backward())


@pytest.mark.parametrize("kind", ["btx_top2", "btx_soft", "bam", "bam_adapters", "expert_routing"])
def test_baseline_training_flops_agree_with_the_flop_counter(saved_llama_family, kind):
    """The baselines' per-token FLOPs leave out only their routers: within 3 % of what the step runs."""
    from baselines.bam import BAMModule
    from baselines.bam_adapters import BAMAdaptersModule
    from baselines.btx import BTXModule
    from baselines.expert_routing import ExpertRoutingModule

    seed_dir, dirs = saved_llama_family
    args = {"seed_model": str(seed_dir), "experts": [str(d) for d in dirs]}
    module = {"btx_top2": lambda: BTXModule(**args, variant="top2", load_balance_coef=0.0),
              "btx_soft": lambda: BTXModule(**args, variant="soft"),
              "bam": lambda: BAMModule(**args),
              "bam_adapters": lambda: BAMAdaptersModule(**args),
              "expert_routing": lambda: ExpertRoutingModule(**args)}[kind]()
    x = _ids()
    counted = _module_step_count(module, x)
    expected = module.flops_per_token(T) * B * T
    assert abs(counted / expected - 1) < 0.03, (counted, expected)
