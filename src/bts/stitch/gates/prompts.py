"""The prompts of the gate analysis (paper §4.3): seeded domain prompts from the test split, and context-switching
prompts built like the blocks of the domain-switching evaluation (``bts.eval.tasks.switching``); see
``bts.stitch.gates`` for how they are chosen."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from bts.core.io import BTSError
from bts.data.switching import DEFAULT_FRACTIONS, parse_type, switch_blocks_of
from bts.data.tokenizer import encode_batch

GATE_SWITCH_TYPES: tuple[str, ...] = ("general>code", "math>general", "code>multilingual", "multilingual>math")
"""Switch types of the context-switching prompts, in order: each domain is once a prefix and once a continuation,
and the three kinds of the evaluation's types (general into an expert domain, the reverse, expert to expert)
appear."""
JOIN = "\n\n"
"""Text between two records of the same domain inside one prompt / segment."""


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(map(int, ids)) for ids in encode_batch(tokenizer, list(texts))]


def _rng(seed: int, *key) -> np.random.Generator:
    """A generator seeded by ``seed`` and a stable (process-independent) hash of ``key``."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode("utf-8"))])


class _Pool:
    """The records of one domain in a seeded order, tokenized on demand; ``take(n)`` fills ``n`` tokens."""

    def __init__(self, domain: str, records: Sequence[Mapping], tokenizer, rng: np.random.Generator):
        keep = [i for i, r in enumerate(records) if isinstance(r.get("text"), str) and r["text"].strip()]
        if not keep:
            raise BTSError(f"domain {domain!r} has no records with text")
        self.domain = domain
        self.texts = {i: records[i]["text"] for i in keep}  # index in ``records`` → text
        self.order = [keep[int(j)] for j in rng.permutation(len(keep))]
        self.pos = 0
        self.tokenizer = tokenizer
        self._cache: dict[int, list[int]] = {}
        self.sep = _encode(tokenizer, [JOIN])[0]
        self.wrapped = False

    def _ids(self, i: int) -> list[int]:
        if i not in self._cache:
            self._cache[i] = _encode(self.tokenizer, [self.texts[i]])[0]
        return self._cache[i]

    def _next(self) -> int:
        if self.pos >= len(self.order):
            self.pos = 0
            self.wrapped = True
        i = self.order[self.pos]
        self.pos += 1
        return i

    def take(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """Token ids (``n_tokens`` at most) from the next record(s), and the record indices used."""
        ids: list[int] = []
        used: list[int] = []
        for _ in range(len(self.order)):
            i = self._next()
            rec = self._ids(i)
            if not rec:
                continue
            if ids:
                ids.extend(self.sep)
            ids.extend(rec)
            used.append(i)
            if len(ids) >= n_tokens:
                break
        if not ids:
            raise BTSError(f"domain {self.domain!r}: no record yields any token")
        return ids[:n_tokens], used


def domain_prompts(records: Mapping[str, Sequence[Mapping]], tokenizer, n_prompts: int = 8, seed: int = 0,
                   max_tokens: int = 128) -> dict[str, list[dict]]:
    """``{domain: [{"ids": [...], "records": [indices into records[domain]]}, ...]}``: ``n_prompts`` seeded prompts per domain,
    each filled with consecutive records of its domain up to ``max_tokens`` tokens (see the module docstring)."""
    if n_prompts < 1:
        raise BTSError(f"n_prompts must be >= 1, got {n_prompts}")
    if max_tokens < 1:
        raise BTSError(f"max_tokens must be >= 1, got {max_tokens}")
    out = {}
    for domain, recs in records.items():
        pool = _Pool(domain, recs, tokenizer, _rng(seed, "domain", domain))
        prompts = []
        for _ in range(n_prompts):
            ids, used = pool.take(max_tokens)
            prompts.append({"ids": ids, "records": used})
        out[domain] = prompts
    return out


def switch_prompts(records: Mapping[str, Sequence[Mapping]], tokenizer, n_switch: int = 4, seed: int = 0,
                   types: Sequence[str] = GATE_SWITCH_TYPES, max_tokens: int = 128,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[dict]:
    """Context-switching prompts: blocks of the domain-switching evaluation (``bts.eval.tasks.switching``), built
    by the same function with the same seed, so each is a block that ``evaluate`` scores when ``max_tokens`` is the
    evaluation's ``seq_len`` (128) and ``seed`` its ``EvalConfig.seed``. Prompt ``i`` is of type
    ``types[i % len(types)]`` (types whose two domains both have records), and is that type's
    ``(i // len(types))``-th block switching at the position nearest the middle of the block.

    Returns ``[{"ids": [...], "type": "A>B", "block": index among the type's blocks, "segments": [{"domain",
    "start", "end"}, ...] (token index ranges, end exclusive), "boundaries": [the switch position], "order":
    [A, B]}]``.
    """
    if n_switch <= 0:
        return []
    usable = [t for t in types if all(d in records for d in parse_type(t))]
    if not usable:
        raise BTSError(f"context-switching prompts need records of both domains of a switch type of {list(types)}")
    if max_tokens < 2:
        raise BTSError(f"max_tokens must be >= 2 for a context-switching prompt, got {max_tokens}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BTSError("the tokenizer has no EOS token (context-switching prompts separate documents with it)")
    middle = min(range(len(fractions)), key=lambda k: abs(float(fractions[k]) - 0.5)) if fractions else 0
    picks = [(usable[i % len(usable)], middle + (i // len(usable)) * len(fractions)) for i in range(n_switch)]
    out = []
    for kind, j in picks:
        block = switch_blocks_of(lambda d: records[d], lambda text: _encode(tokenizer, [text])[0], int(eos),
                                 max_tokens, [kind], fractions, j + 1, seed)[kind][j]
        a, b = parse_type(kind)
        n, p = len(block.ids), block.switch
        out.append({"ids": list(block.ids), "type": kind, "block": j,
                    "segments": [{"domain": a, "start": 0, "end": p}, {"domain": b, "start": p, "end": n}],
                    "boundaries": [p], "order": [a, b]})
    return out
