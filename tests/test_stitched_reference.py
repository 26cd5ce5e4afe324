"""StitchedLM against an independent reference: distinct experts, random non-identity projections and non-zero
gates, composed layer by layer in this file straight from the paper's equations (BTS §2, eq. 3 and eq. 4).

The reference drives each Hugging Face decoder layer itself (as ``LlamaModel.forward`` does in transformers 5.x:
``layers[i](h, attention_mask=..., position_embeddings=..., position_ids=...)`` with the mask from
``transformers.masking_utils.create_causal_mask``), places the stitch layers by the documented rule (after layer
``round_half_up((j+1)·L/K)``, last after layer L, kinds alternating and ending in E2H) and applies:

- E2H: ``g = softmax_models(h0 @ Wg^T viewed [B, T, d, n+1])``; ``h~0 = g0*h0 + sum_i gi*(hi @ Pi^T)``;
  experts continue with ``hi @ Pi^T``.
- H2E: ``g = sigmoid(...)``; hub unchanged; ``h~i = (1 - gi)*hi + gi*(h0 @ Pi^T)``.

Output: the hub's final norm + LM head. Everything in float64, gate dropout off (eval mode).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from bts.stitch.model import StitchConfig, StitchedLM
from conftest import perturbed_copy, tiny_llama

LAYERS, N_EXPERTS, VOCAB = 6, 2, 97


def _reference_after_layers(num_layers: int, k: int) -> list[int]:
    return [int((j + 1) * num_layers / k + 0.5) for j in range(k)]


def _reference_kinds(k: int, all_e2h: bool) -> list[str]:
    if all_e2h:
        return ["e2h"] * k
    return ["e2h" if (k - j) % 2 == 1 else "h2e" for j in range(k)]  # ..., H2E, E2H (last)


def _e2h(hs: list[torch.Tensor], gate_w: torch.Tensor, proj: torch.Tensor) -> list[torch.Tensor]:
    h0 = hs[0]
    b, t, d = h0.shape
    m = len(hs)
    g = torch.softmax((h0 @ gate_w.T).reshape(b, t, d, m), dim=-1)  # one gate per hidden dim per model
    projected = [hs[i] @ proj[i - 1].T for i in range(1, m)]
    hub = g[..., 0] * h0
    for i in range(1, m):
        hub = hub + g[..., i] * projected[i - 1]
    return [hub, *projected]


def _h2e(hs: list[torch.Tensor], gate_w: torch.Tensor, proj: torch.Tensor) -> list[torch.Tensor]:
    h0 = hs[0]
    b, t, d = h0.shape
    m = len(hs)
    g = torch.sigmoid((h0 @ gate_w.T).reshape(b, t, d, m))  # g[..., 0] is computed and unused
    return [h0] + [(1 - g[..., i]) * hs[i] + g[..., i] * (h0 @ proj[i - 1].T) for i in range(1, m)]


def _mask_kwargs(config, h: torch.Tensor, pos: torch.Tensor) -> dict:
    """No cache, no padding, under whichever names this 5.x release's ``create_causal_mask`` takes (written out here
    rather than through bts.core.hf_compat, which is what the reference checks)."""
    every = {"config": config, "input_embeds": h, "inputs_embeds": h, "attention_mask": None,
             "cache_position": pos[0], "past_key_values": None, "cache": None, "position_ids": pos}
    return {k: v for k, v in every.items() if k in inspect.signature(create_causal_mask).parameters}


@torch.no_grad()
def reference_logits(models, stitches, ids: torch.LongTensor) -> torch.Tensor:
    """``stitches``: ``{after_layer: (kind, gate_weight [(n+1)d, d], proj [n, d, d])}`` (1-based after_layer)."""
    pos = torch.arange(ids.shape[1])[None]
    hs, ctx = [], []
    for m in models:
        h = m.model.embed_tokens(ids)
        mask = create_causal_mask(**_mask_kwargs(m.config, h, pos))
        hs.append(h)
        ctx.append((mask, m.model.rotary_emb(h, pos)))
    num_layers = len(models[0].model.layers)
    for layer in range(num_layers):
        hs = [
            m.model.layers[layer](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
            for m, h, (mask, rope) in zip(models, hs, ctx)
        ]
        if layer + 1 in stitches:
            kind, gate_w, proj = stitches[layer + 1]
            hs = (_e2h if kind == "e2h" else _h2e)(hs, gate_w, proj)
    hub = models[0]
    return hub.lm_head(hub.model.norm(hs[0]))


@pytest.fixture(scope="module")
def family():
    hub = tiny_llama(0, layers=LAYERS).double()
    experts = [perturbed_copy(hub, s, scale=0.05) for s in range(1, N_EXPERTS + 1)]
    return hub, experts


def test_reference_driver_reproduces_the_dense_model(family):
    """The layer-by-layer driver (no stitches) is each model's own forward."""
    hub, experts = family
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in (hub, *experts):
            torch.testing.assert_close(reference_logits([m], {}, ids), m(input_ids=ids).logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("k,all_e2h", [(1, False), (2, False), (4, False), (4, True), (3, True)])
def test_stitched_forward_matches_independent_composition(family, k, all_e2h):
    hub, experts = family
    model = StitchedLM(hub, experts, StitchConfig(num_stitch_layers=k, all_e2h=all_e2h, gate_dropout=0.1))
    model.double().eval()  # eval: gate dropout off
    d = model.hidden_size
    g = torch.Generator().manual_seed(100 + k + 10 * all_e2h)
    stitches = {}
    after = _reference_after_layers(LAYERS, k)
    kinds = _reference_kinds(k, all_e2h)
    assert model.placement() == list(zip(after, kinds))
    with torch.no_grad():
        for j, layer in enumerate(model.stitch_layers):
            proj = torch.randn(N_EXPERTS, d, d, generator=g, dtype=torch.float64) / d**0.5  # non-identity
            gate_w = torch.randn((N_EXPERTS + 1) * d, d, generator=g, dtype=torch.float64) * 0.5  # non-zero gates
            layer.stitch_proj.copy_(proj)
            layer.stitch_gate.weight.copy_(gate_w)
            stitches[after[j]] = (kinds[j], gate_w.clone(), proj.clone())
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        got = model(ids)
        ref = reference_logits([hub, *experts], stitches, ids)
        assert got.dtype == torch.float64 and got.shape == (2, 7, VOCAB)
        assert (got - ref).abs().max().item() <= 1e-6
        # teeth: the experts and the stitches matter (not the hub alone, not the identity composition)
        dense = hub(input_ids=ids).logits
        assert (ref - dense).abs().max().item() > 1e-2
        shuffled = {a: (kind, gw, proj.flip(0)) for a, (kind, gw, proj) in stitches.items()}  # swap experts' P
        assert (reference_logits([hub, *experts], shuffled, ids) - got).abs().max().item() > 1e-3
