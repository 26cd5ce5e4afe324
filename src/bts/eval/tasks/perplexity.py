"""Held-out perplexity per domain ("ppl", not a ``TASKS`` metric: it fills ``evaluate(...)["ppl"]``).

The domain's test records, in a seeded order (``random.Random(f"{seed}:ppl:<domain>")``), are tokenised, joined
with EOS after every document (as in the packed training stream) and cut into up to ``ppl_blocks`` full blocks
of ``seq_len`` tokens. Every token but the first of a block is scored. The per-item cell is a block: ``num`` =
its summed token NLL (float64), ``den`` = its scored token count, so the reported value
``bts.eval.stats.cell_value(num, den, "ppl")`` is exp(total NLL / total tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from bts.core.io import BTSError
from bts.eval.tasks.base import Context
from bts.training.perplexity import token_nll


def pack_blocks(docs: Iterable[Sequence[int]], seq_len: int, eos: int, max_blocks: int) -> list[list[int]]:
    """Concatenate ``doc + [eos]`` token lists and cut them into full blocks of ``seq_len`` (at most
    ``max_blocks``); when not even one block fills, the whole (shorter) stream is the only block."""
    blocks: list[list[int]] = []
    buf: list[int] = []
    for doc in docs:
        buf.extend(doc)
        buf.append(eos)
        while len(buf) >= seq_len and len(blocks) < max_blocks:
            blocks.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(blocks) >= max_blocks:
            break
    if not blocks and len(buf) >= 2:
        blocks.append(buf)
    return blocks


def perplexity_cell(ctx: Context, domain: str) -> tuple[list[float], list[int]]:
    """(summed token NLL per block, scored tokens per block) of one domain's test split."""
    recs = ctx.load(domain)
    order = ctx.sample(recs, len(recs), f"ppl:{domain}")
    blocks = pack_blocks((ctx.encode(r["text"]) for r in order), ctx.seq_len, ctx.eos, ctx.cfg.ppl_blocks)
    if not blocks:
        raise BTSError(f"the '{domain}' test split has too little text for a perplexity block")
    num: list[float] = []
    bs = max(1, ctx.cfg.ppl_batch_size)
    for i in ctx.bar(range(0, len(blocks), bs), f"ppl/{domain}"):
        x = torch.tensor(blocks[i: i + bs], dtype=torch.long, device=ctx.device)  # equal lengths: see pack_blocks
        num += token_nll(ctx.model(x), x).double().sum(-1).cpu().tolist()
    return num, [len(b) - 1 for b in blocks]
