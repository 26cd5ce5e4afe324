"""Text that switches domain mid-block: the blocks that ``bts.eval.tasks.switching`` scores and that the gate
analysis (``bts.stitch.gates``) draws its context-switching prompts from.

Block construction (deterministic; the same for every model that shares a tokenizer). A *switch type* ``"A>B"``
names a prefix domain ``A`` and a continuation domain ``B`` (``EvalConfig.switch_types``; default: general into
each expert domain, each expert domain into general, and every ordered pair of expert domains: 12 types). Each
side of a type has its own seeded record order, ``random.Random(f"{seed}:switch:A>B:prefix")`` over ``A``'s test
records and ``...:continuation`` over ``B``'s (records whose text tokenises to nothing are skipped; the order
starts again from its beginning when a long run of blocks exhausts it). Block ``j`` of a type (``j`` = 0 ..
``switch_blocks`` - 1) switches at position ``p = round(f * seq_len)`` with ``f = switch_fractions[j % len]``
(default 1/4, 1/2, 3/4 of the block) and is a window of a packed stream in which a run of ``A`` documents is
followed by a run of ``B`` documents (every document followed by EOS, as in training)::

    [ last p tokens of  docA_i EOS docA_i+1 EOS ... docA_k EOS ][ first seq_len - p tokens of  docB_m EOS ... ]
    0                                                       p-1  p                                   seq_len-1

So the prefix ends with the EOS of a complete ``A`` document, the token at ``p`` starts a ``B`` document, and the
two sides never share a record (they are different domains; within one side, consecutive blocks take consecutive
records). Scored: the ``seq_len - p`` tokens at positions ``p .. seq_len - 1``, each predicted from the whole block
before it (prefix included), so a per-sequence posterior carries the prefix's evidence into the continuation,
which is the point. The per-item cell is a block: ``num`` = summed token NLL of its post-switch tokens (float64),
``den`` = their count, kind "ppl", exactly as the perplexity cells (``bts.eval.tasks.perplexity``), so
``bts.eval.stats.paired_ci`` compares methods block by block. Cells: ``switch:<A>>B>`` per type and ``switch:all``
(every block of every type: the pooled post-switch tokens).

The gate analysis (``bts.stitch.gates.prompts.switch_prompts``) draws its context-switching prompts with
``switch_blocks_of``, so the gate figures show the same kind of block that is scored here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bts.core.io import BTSError
from bts.data.domains import DOMAINS, EXPERT_DOMAINS

SWITCH = "switch"
"""Name that selects the switching evaluation in ``evaluate(tasks=...)`` (like "ppl"), and part of each
side's seed key."""
ALL = "all"
"""Key of the pooled cell (every post-switch token of every type)."""
SEP = ">"


def default_switch_types(general: str = "general", experts: Sequence[str] = EXPERT_DOMAINS) -> tuple[str, ...]:
    """General into each expert domain, each expert domain into general, then every ordered expert pair."""
    return (*(f"{general}{SEP}{e}" for e in experts), *(f"{e}{SEP}{general}" for e in experts),
            *(f"{a}{SEP}{b}" for a in experts for b in experts if a != b))


DEFAULT_TYPES: tuple[str, ...] = default_switch_types()
DEFAULT_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)


def parse_type(kind: str, domains: Sequence[str] = DOMAINS) -> tuple[str, str]:
    """``"A>B"`` -> ``(A, B)``; a malformed type, an unknown domain or ``A == B`` is a ``BTSError``."""
    parts = str(kind).split(SEP)
    if len(parts) != 2 or not all(parts):
        raise BTSError(f"switch type {kind!r} is not of the form A{SEP}B (e.g. general{SEP}code)")
    a, b = parts
    for d in (a, b):
        if d not in domains:
            raise BTSError(f"switch type {kind!r}: unknown domain {d!r} (known: {', '.join(domains)})")
    if a == b:
        raise BTSError(f"switch type {kind!r}: the two sides must be different domains")
    return a, b


def check_switch_settings(types: Sequence[str], fractions: Sequence[float], blocks: int) -> None:
    """Refuse bad ``switch_*`` settings of ``EvalConfig`` (one ``BTSError``)."""
    if isinstance(types, str) or not types:
        raise BTSError("switch_types must be a non-empty list of A>B domain pairs")
    for t in types:
        parse_type(t)
    if len(set(types)) != len(types):
        raise BTSError(f"switch_types lists a type twice: {list(types)}")
    if isinstance(fractions, str) or not fractions:
        raise BTSError("switch_fractions must be a non-empty list of numbers in (0, 1)")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise BTSError(f"switch_fractions: {f!r} is not a number strictly between 0 and 1")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise BTSError(f"switch_blocks must be an integer >= 1, got {blocks!r}")


def switch_positions(seq_len: int, fractions: Sequence[float]) -> list[int]:
    """``round(f * seq_len)`` per fraction; each must leave at least one token on either side."""
    out = []
    for f in fractions:
        p = round(float(f) * seq_len)
        if not 1 <= p <= seq_len - 1:
            raise BTSError(f"switch fraction {f} of a {seq_len}-token block puts the switch at {p}: it must leave "
                           "at least one token on each side")
        out.append(p)
    return out


@dataclass(frozen=True)
class SwitchBlock:
    """One block: ``ids`` (``seq_len`` tokens), the switch position (first continuation token), and the records
    (indices into each domain's record list) of its prefix and continuation."""

    kind: str
    ids: tuple[int, ...]
    switch: int
    prefix_records: tuple[int, ...]
    continuation_records: tuple[int, ...]

    @property
    def scored(self) -> int:
        return len(self.ids) - self.switch


class _Side:
    """One side of a switch type: a domain's records in a seeded order, tokenised on demand (shared cache)."""

    def __init__(self, records: Sequence[Mapping], encode: Callable[[int], list[int]], key: str, domain: str):
        self.order = list(range(len(records)))
        random.Random(key).shuffle(self.order)
        self.encode, self.domain, self.pos = encode, domain, 0

    def docs(self, n_tokens: int, eos: int) -> tuple[list[int], list[int]]:
        """``doc EOS doc EOS ...`` of the next records until at least ``n_tokens`` tokens, and their indices."""
        ids: list[int] = []
        used: list[int] = []
        misses = 0
        while len(ids) < n_tokens:
            if self.pos >= len(self.order):
                self.pos = 0
            i = self.order[self.pos]
            self.pos += 1
            doc = self.encode(i)
            if not doc:
                misses += 1
                if misses > len(self.order):
                    raise BTSError(f"no '{self.domain}' record yields any token for a domain-switching block")
                continue
            misses = 0
            ids += doc
            ids.append(eos)
            used.append(i)
        return ids, used


def switch_blocks_of(load: Callable[[str], Sequence[Mapping]], encode: Callable[[str], list[int]], eos: int,
                     seq_len: int, types: Sequence[str] = DEFAULT_TYPES,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS, n_blocks: int = 12,
                     seed: int = 0) -> dict[str, list[SwitchBlock]]:
    """``{type: [SwitchBlock] * n_blocks}`` built as the module docstring says. ``load(domain)`` returns the
    domain's test records (``{"text": ...}``), ``encode(text)`` token ids without special tokens. The blocks of a
    type depend only on that type, the records, the tokenizer, ``seq_len``, ``fractions`` and ``seed`` (not on the
    other types), so a block can be rebuilt on its own (``bts.stitch.gates``)."""
    check_switch_settings(types, fractions, n_blocks)
    positions = switch_positions(seq_len, fractions)
    cache: dict[tuple[str, int], list[int]] = {}

    def encoder(domain: str, recs: Sequence[Mapping]) -> Callable[[int], list[int]]:
        def enc(i: int) -> list[int]:
            if (domain, i) not in cache:
                text = recs[i].get("text") if isinstance(recs[i], Mapping) else None
                cache[(domain, i)] = list(encode(text)) if isinstance(text, str) and text.strip() else []
            return cache[(domain, i)]
        return enc

    out: dict[str, list[SwitchBlock]] = {}
    for kind in types:
        a, b = parse_type(kind)
        ra, rb = load(a), load(b)
        pre = _Side(ra, encoder(a, ra), f"{seed}:{SWITCH}:{kind}:prefix", a)
        cont = _Side(rb, encoder(b, rb), f"{seed}:{SWITCH}:{kind}:continuation", b)
        blocks = []
        for j in range(n_blocks):
            p = positions[j % len(positions)]
            head, used_a = pre.docs(p, eos)
            tail, used_b = cont.docs(seq_len - p, eos)
            blocks.append(SwitchBlock(kind, tuple(head[-p:] + tail[: seq_len - p]), p, tuple(used_a),
                                      tuple(used_b)))
        out[kind] = blocks
    return out
