"""The stitch layer: eq. 3 (E2H) and eq. 4 (H2E) against an independent recomputation, init, parameter count."""

from __future__ import annotations

import pytest
import torch

from bts.core.io import BTSError
from bts.stitch.layer import StitchLayer, stitch_param_count

B, T, D = 2, 5, 8


def _hidden(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=g) for _ in range(n + 1)]


def _randomise(layer: StitchLayer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.stitch_proj.copy_(torch.randn(layer.stitch_proj.shape, generator=g) / D**0.5)
        layer.stitch_gate.weight.copy_(torch.randn(layer.stitch_gate.weight.shape, generator=g))


def _gate(layer: StitchLayer, h0: torch.Tensor, model: int, dim: int) -> torch.Tensor:
    """Gate logit of model ``model`` at hidden dimension ``dim``: row dim·(n+1)+model of w_gate (documented layout)."""
    w = layer.stitch_gate.weight[dim * (layer.n_experts + 1) + model]
    return h0 @ w  # [B, T]


def _ref_e2h(layer: StitchLayer, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    n = layer.n_experts
    h0 = hs[0]
    proj = [hs[i] @ layer.stitch_proj[i - 1].T for i in range(1, n + 1)]
    out0 = torch.zeros_like(h0)
    for k in range(D):
        logits = torch.stack([_gate(layer, h0, m, k) for m in range(n + 1)], dim=-1)  # [B, T, n+1]
        w = logits.exp() / logits.exp().sum(-1, keepdim=True)
        out0[..., k] = w[..., 0] * h0[..., k] + sum(w[..., i] * proj[i - 1][..., k] for i in range(1, n + 1))
    return [out0, *proj]


def _ref_h2e(layer: StitchLayer, hs: list[torch.Tensor]) -> list[torch.Tensor]:
    n = layer.n_experts
    h0 = hs[0]
    outs = [h0]
    for i in range(1, n + 1):
        p = h0 @ layer.stitch_proj[i - 1].T
        o = torch.empty_like(h0)
        for k in range(D):
            g = 1 / (1 + torch.exp(-_gate(layer, h0, i, k)))
            o[..., k] = (1 - g) * hs[i][..., k] + g * p[..., k]
        outs.append(o)
    return outs


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["e2h", "h2e"])
def test_equations_match_independent_recomputation(kind, n):
    layer = StitchLayer(D, n, kind, gate_dropout=0.3).eval()  # eval: dropout off
    _randomise(layer)
    hs = _hidden(n)
    ref = (_ref_e2h if kind == "e2h" else _ref_h2e)(layer, hs)
    with torch.no_grad():
        out = layer(hs)
    assert len(out) == n + 1
    for o, r in zip(out, ref):
        assert o.shape == (B, T, D)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_e2h_returns_projected_expert_states():
    layer = StitchLayer(D, 2, "e2h").eval()
    _randomise(layer)
    hs = _hidden(2)
    with torch.no_grad():
        out = layer(hs)
        for i in (1, 2):
            torch.testing.assert_close(out[i], hs[i] @ layer.stitch_proj[i - 1].T)
            assert not torch.allclose(out[i], hs[i])


def test_h2e_keeps_hub_and_ignores_hub_gate_slot():
    layer = StitchLayer(D, 2, "h2e").eval()
    _randomise(layer)
    hs = _hidden(2)
    with torch.no_grad():
        out = layer(hs)
        assert torch.equal(out[0], hs[0])
        layer.gate_rows(0).normal_(0, 5.0)  # g0 is computed but unused
        out2 = layer(hs)
    for a, b in zip(out, out2):
        assert torch.equal(a, b)


def test_gate_rows_select_a_model():
    """Saturating model 2's gate rows routes the hub through expert 2's projection."""
    layer = StitchLayer(D, 2, "e2h").eval()
    _randomise(layer)
    hs = _hidden(2)
    with torch.no_grad():
        layer.stitch_gate.weight.zero_()
        hs[0] = hs[0].abs() + 1.0  # positive hub state so a positive weight saturates
        layer.gate_rows(2).fill_(50.0)
        out = layer(hs)
    torch.testing.assert_close(out[0], hs[2] @ layer.stitch_proj[1].T)


def test_identity_init():
    for kind in ("e2h", "h2e"):
        layer = StitchLayer(D, 3, kind)
        assert torch.equal(layer.stitch_proj, torch.eye(D).expand(3, D, D))
        assert torch.count_nonzero(layer.stitch_gate.weight) == 0
        hs = _hidden(3)
        layer.eval()
        out = layer(hs)
        if kind == "h2e":  # 0.5 gates: h~i = (hi + h0) / 2
            torch.testing.assert_close(out[1], (hs[1] + hs[0]) / 2)
        else:  # uniform gates
            torch.testing.assert_close(out[0], torch.stack(hs).mean(0))
    rnd = StitchLayer(D, 3, "e2h", init="random")
    assert 0 < rnd.stitch_proj.std() < 0.1 and torch.count_nonzero(rnd.stitch_gate.weight) > 0
    with pytest.raises(BTSError):
        StitchLayer(D, 3, "e2h", init="orthogonal")
    with pytest.raises(BTSError):
        StitchLayer(D, 3, "mix")
    with pytest.raises(BTSError):
        StitchLayer(D, 0, "e2h")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_param_count(n):
    layer = StitchLayer(D, n, "e2h")
    names = {name: p.shape for name, p in layer.named_parameters()}
    assert names == {"stitch_proj": (n, D, D), "stitch_gate.weight": ((n + 1) * D, D)}
    assert sum(p.numel() for p in layer.parameters()) == (2 * n + 1) * D * D == stitch_param_count(D, n)
    assert stitch_param_count(3072, 3) * 4 == 264_241_152  # paper: d=3072, n=3, K=4 -> 264M


def test_gate_dropout_only_in_training():
    layer = StitchLayer(D, 2, "e2h", gate_dropout=0.5)
    _randomise(layer)
    hs = _hidden(2)
    torch.manual_seed(0)
    train_out = layer.train()(hs)[0]
    eval_out = layer.eval()(hs)[0]
    assert not torch.allclose(train_out, eval_out)
    nodrop = StitchLayer(D, 2, "e2h", gate_dropout=0.0)
    nodrop.load_state_dict(layer.state_dict())
    torch.testing.assert_close(nodrop.train()(hs)[0], eval_out)


def test_record_gates_and_gradients():
    for kind in ("e2h", "h2e"):
        layer = StitchLayer(D, 2, kind).train()
        _randomise(layer)
        layer.record_gates = True
        out = layer(_hidden(2))
        assert layer.last_gates.shape == (B, T, 3)
        if kind == "e2h":
            torch.testing.assert_close(layer.last_gates.sum(-1), torch.ones(B, T))
        sum(o.sum() for o in out[1:] + out[:1]).backward()
        assert layer.stitch_proj.grad is not None and layer.stitch_gate.weight.grad.abs().sum() > 0


def test_bf16_inputs_keep_dtype():
    layer = StitchLayer(D, 1, "e2h").eval()
    out = layer([h.to(torch.bfloat16) for h in _hidden(1)])
    assert all(o.dtype == torch.bfloat16 for o in out)
