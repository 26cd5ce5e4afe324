"""How close can BTS get to each expert at the tiny scale? A diagnostic of the hub's output head.

BTS's output is always the **hub's** final norm and LM head (DESIGN.md §1). Even a perfect last E2H layer (gate 1
on the domain's expert) can only hand the hub head ``w_proj(h_expert)``: a linear map of the expert's final state.
This script measures, on each expert domain's held-out test blocks (``runs/tiny`` from ``make reproduce``):

- ``expert``: the expert itself (its own norm and head);
- ``seed``: the seed (= hub) itself;
- ``expert→hub head (I)``: the expert's final hidden state through the hub's norm and head (identity projection);
- ``expert→hub head (best W)``: the same with a d×d map ``W`` trained on that domain's train split alone (Adam,
  lr 1e-2, 300 steps of 16×128 tokens, from the identity): the best a last E2H projection could do with a perfect
  gate, trained only for this domain;
- ``bts``: the trained BTS model (``runs/tiny/bts``).

Writes ``benchmarks/CEILING.md``. Run: ``.venv/bin/python benchmarks/bts_ceiling.py [--runs runs/tiny]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import torch

from bts.data import DomainMixDataModule, blocks_of
from bts.eval.loading import load_for_eval
from bts.eval.perplexity import token_nll
from bts.io import atomic_write_text
from bts.modeling import decoder_parts, load_causal_lm

DOMAINS = ("code", "math", "multilingual")
SEQ, BLOCKS, STEPS, BATCH, LR = 128, 16, 300, 16, 1e-2


def blocks(dm: DomainMixDataModule, domain: str, split: str, n: int | None) -> torch.Tensor:
    return torch.from_numpy(blocks_of(dm.token_stream(domain, split), SEQ)[:n].astype(np.int64))  # [n, T]


def final_state(model, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output before the final norm, ``[B, T, d]``."""
    captured = {}
    handle = decoder_parts(model).norm.register_forward_pre_hook(lambda _m, a: captured.setdefault("h", a[0]))
    try:
        model.model(ids)
    finally:
        handle.remove()
    return captured["h"]


def ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(token_nll(logits, ids).mean().exp())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/tiny")
    ap.add_argument("--out", default="benchmarks/CEILING.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    runs = Path(args.runs)
    dm = DomainMixDataModule(tokenizer_dir=str(runs / "tokenizer"), mixture="bts")
    seed = load_causal_lm(runs / "seed")
    hub = decoder_parts(seed)
    bts, _, _ = load_for_eval(runs / "bts")
    bts.eval()
    rows = []
    for domain in DOMAINS:
        expert = load_causal_lm(runs / f"expert_{domain}")
        test, train = blocks(dm, domain, "test", BLOCKS), blocks(dm, domain, "train", None)
        with torch.no_grad():
            h_test = final_state(expert, test)
            row = {
                "domain": domain,
                "expert": ppl(expert(test).logits, test),
                "seed": ppl(seed(test).logits, test),
                "identity": ppl(hub.lm_head(hub.norm(h_test)), test),
                "bts": ppl(bts(test), test),
            }
        w = torch.nn.Parameter(torch.eye(h_test.shape[-1]))
        opt = torch.optim.Adam([w], lr=LR)
        for _ in range(STEPS):
            ids = train[torch.randint(0, len(train), (BATCH,))]
            with torch.no_grad():
                h = final_state(expert, ids)
            loss = token_nll(hub.lm_head(hub.norm(h @ w.T)), ids).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            row["best_w"] = ppl(hub.lm_head(hub.norm(h_test @ w.T)), test)
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# BTS ceiling at the tiny scale: the hub's head on the experts' states",
        "",
        f"Written by `benchmarks/bts_ceiling.py` on {dt.datetime.now().isoformat(timespec='seconds')} from "
        f"`{runs}`; definitions in its docstring. Perplexity on the first {BLOCKS} test blocks of {SEQ} tokens of "
        "each domain's packed test stream (not the eval suite's block selection, so numbers differ slightly from "
        "`results/tiny`).",
        "",
        "| domain | expert | seed (hub) | expert→hub head (I) | expert→hub head (best W) | bts | bts ÷ expert |"
        " best W ÷ expert | bts ÷ best W |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['expert']:.2f} | {r['seed']:.2f} | {r['identity']:.2f} | "
                     f"{r['best_w']:.2f} | {r['bts']:.2f} | {r['bts'] / r['expert']:.2f} | "
                     f"{r['best_w'] / r['expert']:.2f} | {r['bts'] / r['best_w']:.2f} |")
    lines += [
        "",
        "Reading: `best W ÷ expert` is what a *perfect* last E2H layer (all gate on the domain's expert, its",
        "projection fitted to that domain alone) would leave between BTS and the expert, because the output is",
        "always the hub's norm and head (the paper's design) and the tiny experts' final states and heads drifted",
        "from the seed's further than a linear map bridges. Earlier E2H layers could in principle feed expert",
        "states through the hub's remaining layers instead; `bts ÷ best W` shows how far the trained BTS is from",
        "the last-layer ceiling, and the stitch-layer sweep in `results/tiny/ablations.md` shows whether more",
        "(earlier) stitch layers help.",
        "",
    ]
    atomic_write_text(Path(args.out), "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
