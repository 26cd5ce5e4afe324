"""The chunked LM-head cross-entropy (bts.training.losses) against F.cross_entropy of the materialised logits: value and
gradients, every chunking, a frozen head, a tied head inside a training module, bf16 autocast; bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bts.training.losses import linear_cross_entropy
from conftest import tiny_llama

N, D, V = 37, 16, 53


def _case(dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(True)
    head = torch.nn.Linear(D, V, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=g, dtype=dtype))
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, head, targets


def _grads(loss, hidden, head):
    loss.backward()
    out = hidden.grad.clone(), None if head.weight.grad is None else head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None
    return out


@pytest.mark.parametrize("chunk", [1, 7, N, 1000])
def test_value_and_gradients_equal_the_materialised_logits(chunk):
    hidden, head, targets = _case()
    ours = linear_cross_entropy(hidden, head, targets, chunk_tokens=chunk)
    gh, gw = _grads(ours, hidden, head)
    ref = F.cross_entropy(head(hidden), targets)
    rh, rw = _grads(ref, hidden, head)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-12)
    assert torch.allclose(gh, rh, rtol=0, atol=1e-12) and torch.allclose(gw, rw, rtol=0, atol=1e-12)


def test_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    hidden, head, targets = _case()
    head.weight.requires_grad_(False)
    gh, gw = _grads(linear_cross_entropy(hidden, head, targets, chunk_tokens=5), hidden, head)
    assert gw is None
    rh, _ = _grads(F.cross_entropy(head(hidden), targets), hidden, head)
    assert torch.allclose(gh, rh, rtol=0, atol=1e-12)


def test_upstream_scale_is_applied():
    hidden, head, targets = _case()
    gh, gw = _grads(3.5 * linear_cross_entropy(hidden, head, targets, chunk_tokens=4), hidden, head)
    rh, rw = _grads(3.5 * F.cross_entropy(head(hidden), targets), hidden, head)
    assert torch.allclose(gh, rh, atol=1e-12) and torch.allclose(gw, rw, atol=1e-12)


def test_training_module_with_a_tied_head_matches_the_logits_loss():
    """CausalLMModule.lm_loss goes through hidden_and_head; with tied embeddings the head's gradient reaches the
    embedding through both uses, exactly as with the logits."""
    from bts.dense.module import CausalLMModule
    from bts.training.module import LMTrainingModule

    module = CausalLMModule.__new__(CausalLMModule)
    LMTrainingModule.__init__(module)
    model = tiny_llama(0, layers=2).double()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    module.model = model.train()
    x = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    ours = module.lm_loss(x)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model(input_ids=x, use_cache=False).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, p in zip(ours_grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-10)


def test_bf16_autocast_is_within_bf16_tolerance_of_the_autocast_logits_path():
    hidden, head, targets = _case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, head, targets, chunk_tokens=8)
        ref = F.cross_entropy(head(hidden).float(), targets)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))  # same bf16 logits, fp32 reduction


def test_a_head_with_bias_is_refused():
    hidden, _, targets = _case()
    with pytest.raises(ValueError, match="no bias"):
        linear_cross_entropy(hidden, torch.nn.Linear(D, V).double(), targets)
