"""The head-drift ceiling (docs/design.md §7): can the hub's final norm and LM head read an expert's last hidden state?

BTS's output is always the hub's norm and head (paper §2). Even a perfect last E2H layer (all gate on a domain's
expert) can only hand that head ``W h_expert``, a d×d linear map of the expert's final (pre-norm) state. For each
expert domain this fits the best such ``W`` and reports::

    ceiling = min(ppl(hub_head(hub_norm(W h_expert))), ppl(hub_head(hub_norm(h_expert)))) / ppl(expert)
                                                                      # on the domain's held-out test blocks

≈ 1.0 when the expert stayed in the seed's representation space (the paper's regime: lr 5e-6, heads barely move);
well above 1 when the expert's head and final states drifted beyond what the hub can read, and then BTS cannot get
within that factor of the expert on its domain. ``W`` minimises the next-token cross-entropy on ``fit_blocks``
*validation* blocks of the domain (held out from every model's training: on training blocks the expert's states
are partly memorised, and a map fitted there generalises worse than the identity); it is not a least-squares problem (RMSNorm and softmax sit between ``W`` and the
loss), so it is fitted to convergence with full-batch L-BFGS (strong-Wolfe line search) from the identity, and
the final gradient norm is recorded. A map fitted on one set of documents can generalise worse than the identity
(measured here: it adapts to the fitting documents' vocabulary), and the identity is itself a linear map, so the
ceiling takes the better of the two on the test blocks (``ceiling_of``); both are recorded.

Command: ``bts ceiling --runs runs/tiny [--out runs/tiny/ceiling]`` (``bts.stitch.command``, a stage of
``bts reproduce``); writes
``ceiling.json``: ``{domain: {expert_ppl, seed_ppl, identity_ppl, best_map_ppl, ceiling, own_ppl_gain, ...}}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bts.core.io import BTSError
from bts.data.domains import EXPERT_DOMAINS


def final_state(model, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output before the final norm, ``[B, T, d]``."""
    from bts.dense.modeling import decoder_parts

    captured = {}
    handle = decoder_parts(model).norm.register_forward_pre_hook(lambda _m, a: captured.setdefault("h", a[0]))
    try:
        model.model(ids)
    finally:
        handle.remove()
    return captured["h"]


def _mean_nll(head, norm, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor | None, chunk: int = 32) -> torch.Tensor:
    """Mean next-token NLL of ``head(norm(h @ w.T))`` over all blocks (chunked to bound memory)."""
    total, count = 0.0, 0
    for i in range(0, len(ids), chunk):
        hi = h[i: i + chunk]
        if w is not None:
            hi = hi @ w.T
        logits = head(norm(hi))[:, :-1].float()
        tgt = ids[i: i + chunk, 1:]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum")
        count += tgt.numel()
    return total / count


def fit_best_map(head, norm, h: torch.Tensor, ids: torch.Tensor, max_iter: int = 300, tol: float = 1e-6):
    """(W [d, d], iterations, final gradient norm): full-batch L-BFGS on the cross-entropy from the identity."""
    d = h.shape[-1]
    w = torch.nn.Parameter(torch.eye(d, dtype=h.dtype, device=h.device))
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    n_evals = [0]

    def closure():
        opt.zero_grad()
        loss = _mean_nll(head, norm, h, ids, w)
        loss.backward()
        n_evals[0] += 1
        return loss

    opt.step(closure)
    opt.zero_grad()
    loss = _mean_nll(head, norm, h, ids, w)
    loss.backward()
    return w.detach(), n_evals[0], float(w.grad.norm())


def _blocks(dm, domain: str, split: str, n: int, seq_len: int) -> torch.Tensor:
    """``n`` evenly spaced blocks of a domain's split: a fixed, order-independent sample ``[n, seq_len]``."""
    from bts.data import blocks_of

    b = blocks_of(dm.token_stream(domain, split), seq_len)
    if len(b) == 0:
        raise BTSError(f"the {domain} {split} split has no block of {seq_len} tokens")
    idx = np.linspace(0, len(b) - 1, num=min(n, len(b))).round().astype(np.int64)
    return torch.from_numpy(b[idx].astype(np.int64))


def ceiling_of(row: dict) -> float:
    """The ceiling of one ``ceiling.json`` row: the better of the fitted map and the identity, ÷ the expert."""
    return min(row["best_map_ppl"], row["identity_ppl"]) / row["expert_ppl"]


def measure(runs: Path, domains=EXPERT_DOMAINS, fit_blocks: int = 192, test_blocks: int = 128,
            seq_len: int = 128, max_iter: int = 300, device: str = "cpu") -> dict:
    """The ceiling of every ``runs/expert_<domain>`` against the hub ``runs/seed`` (see the module docstring)."""
    from bts.data import DomainMixDataModule
    from bts.dense.modeling import decoder_parts, load_causal_lm, resolve_device
    from bts.training.perplexity import token_nll

    runs = Path(runs)
    for need in ["seed", "tokenizer", *(f"expert_{d}" for d in domains)]:
        if not (runs / need).is_dir():
            raise BTSError(f"{runs / need} is missing (the ceiling needs the seed, the experts and the tokenizer)")
    dev = resolve_device(device)
    torch.manual_seed(0)
    dm = DomainMixDataModule(tokenizer_dir=str(runs / "tokenizer"), mixture="bts")
    seed = load_causal_lm(runs / "seed").to(dev).eval()
    hub = decoder_parts(seed)
    for p in seed.parameters():
        p.requires_grad_(False)
    out: dict = {}
    for domain in domains:
        t0 = time.perf_counter()

        train = _blocks(dm, domain, "val", fit_blocks, seq_len).to(dev)
        test = _blocks(dm, domain, "test", test_blocks, seq_len).to(dev)
        expert = load_causal_lm(runs / f"expert_{domain}").to(dev).eval()
        with torch.no_grad():
            h_train, h_test = final_state(expert, train), final_state(expert, test)

            def ppl(logits, test=test):
                return float(token_nll(logits, test).mean().exp())

            row = {"expert_ppl": ppl(expert(test).logits), "seed_ppl": ppl(seed(test).logits),
                   "identity_ppl": float(_mean_nll(hub.lm_head, hub.norm, h_test, test, None).exp())}
        w, evals, gnorm = fit_best_map(hub.lm_head, hub.norm, h_train, train, max_iter=max_iter)
        with torch.no_grad():
            row["best_map_ppl"] = float(_mean_nll(hub.lm_head, hub.norm, h_test, test, w).exp())
        row["ceiling"] = ceiling_of(row)
        row["fitted_map_ratio"] = row["best_map_ppl"] / row["expert_ppl"]
        row["own_ppl_gain"] = 1.0 - row["expert_ppl"] / row["seed_ppl"]
        row |= {"fit_blocks": len(train), "test_blocks": len(test), "lbfgs_evals": evals,
                "final_grad_norm": gnorm, "seconds": round(time.perf_counter() - t0, 1)}
        out[domain] = row
        del expert
        print(f"ceiling {domain}: expert {row['expert_ppl']:.3f}, hub head on expert states: identity "
              f"{row['identity_ppl']:.3f}, best map {row['best_map_ppl']:.3f} -> ceiling {row['ceiling']:.3f} "
              f"(own-domain gain {row['own_ppl_gain']:.3f}; {evals} L-BFGS evaluations, |grad| {gnorm:.1e})",
              flush=True)
    return out
