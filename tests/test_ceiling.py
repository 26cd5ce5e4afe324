"""The head-drift ceiling's map fit (bts.stitch.ceiling): L-BFGS reaches the loss of a known map from the identity."""

from __future__ import annotations

import torch

from bts.stitch.ceiling import _mean_nll, fit_best_map


def test_best_map_recovers_a_known_rotation():
    torch.manual_seed(0)
    d, vocab, n, t = 16, 50, 24, 20
    head = torch.nn.Linear(d, vocab, bias=False)
    norm = torch.nn.RMSNorm(d)
    with torch.no_grad():
        head.weight.mul_(8.0)  # confident heads: the data says a lot about the map
        norm.weight.copy_(torch.rand(d) + 0.5)
    for p in [*head.parameters(), *norm.parameters()]:
        p.requires_grad_(False)
    a = torch.linalg.qr(torch.randn(d, d))[0]  # the "drift": an orthogonal map of the expert's states
    h = torch.randn(n, t, d)
    with torch.no_grad():
        logits = head(norm(h @ a.T))
        ids = torch.distributions.Categorical(logits=logits).sample()  # [n, t]: tokens the true map explains
    # the loss scores position i's logits against token i+1: shift so that the map's logits predict them
    ids = torch.cat([ids[:, :1], ids[:, :-1]], dim=1)
    identity = float(_mean_nll(head, norm, h, ids, None))
    truth = float(_mean_nll(head, norm, h, ids, a))
    w, evals, gnorm = fit_best_map(head, norm, h, ids, max_iter=200)
    fitted = float(_mean_nll(head, norm, h, ids, w))
    assert fitted <= truth + 1e-3 < identity - 0.5  # at least as good as the true map, far better than identity
    assert gnorm < 1e-3 and evals > 1
