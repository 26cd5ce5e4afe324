"""Perplexity on text that switches domain mid-block ("switch", not a ``TASKS`` metric: it fills
``evaluate(...)["switch_ppl"]``).

Why. The paper compares BTS with per-sequence routing (BTM's posterior ensemble, expert routing) in Table 3 and
argues from its per-token E2H gates (§4.3, context-switching prompts) that the hub can listen to a different
expert token by token. On single-domain blocks a per-sequence posterior is already near-perfect routing, so that
advantage cannot show there (docs/design.md §7, "Per-token routing needs text that switches domain"). These blocks
change domain once, at a known position, and only the tokens after the change are scored.

Blocks: ``bts.data.switching`` (construction, deterministic). Scored: the ``seq_len - p`` tokens after the switch,
each predicted from the whole block before it; the per-item cell is a block (``num`` = summed token NLL of its
post-switch tokens, float64; ``den`` = their count, kind "ppl"), so ``bts.eval.stats.paired_ci`` compares
methods block by block. Cells: ``switch:<A>>B>`` per type and ``switch:all`` (every block of every type).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bts.data.switching import ALL, SWITCH, SwitchBlock, switch_blocks_of
from bts.eval.tasks.base import Context
from bts.training.perplexity import token_nll


def post_switch_nll(model, blocks: Sequence[SwitchBlock], device, batch_size: int = 8) -> list[float]:
    """Summed NLL (float64) of each block's tokens at positions ``switch .. end``, every token predicted from the
    whole block before it: ``model(block)`` once per block (batched; blocks have equal lengths)."""
    out: list[float] = []
    bs = max(1, int(batch_size))
    for i in range(0, len(blocks), bs):
        chunk = blocks[i: i + bs]
        x = torch.tensor([b.ids for b in chunk], dtype=torch.long, device=device)
        nll = token_nll(model(x), x).double()  # [B, T-1]: entry t scores token t + 1
        start = torch.tensor([b.switch - 1 for b in chunk], device=nll.device)
        keep = torch.arange(nll.shape[1], device=nll.device)[None, :] >= start[:, None]
        out += torch.where(keep, nll, torch.zeros_like(nll)).sum(-1).cpu().tolist()
    return out


def switching_cells(ctx: Context) -> tuple[dict[str, tuple[list[float], list[int]]], dict[str, list[SwitchBlock]]]:
    """``({type: (num, den), ..., "all": (num, den)}, the blocks)`` of the run's model on ``ctx``'s test records."""
    cfg = ctx.cfg
    blocks = switch_blocks_of(ctx.load, ctx.encode, ctx.eos, ctx.seq_len, cfg.switch_types, cfg.switch_fractions,
                              cfg.switch_blocks, cfg.seed)
    flat = [b for bl in blocks.values() for b in bl]  # one pass over every block: batches span the types
    bs = max(1, cfg.ppl_batch_size)
    num: list[float] = []
    for i in ctx.bar(range(0, len(flat), bs), SWITCH, total=-(-len(flat) // bs)):
        num += post_switch_nll(ctx.model, flat[i: i + bs], ctx.device, bs)
    cells: dict[str, tuple[list[float], list[int]]] = {}
    start = 0
    for kind, bl in blocks.items():
        cells[kind] = (num[start: start + len(bl)], [b.scored for b in bl])
        start += len(bl)
    cells[ALL] = (num, [b.scored for b in flat])
    return cells, blocks
