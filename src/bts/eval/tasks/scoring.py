"""Scoring machinery shared by the families: log-likelihood multiple choice and teacher-forced span exact match.

Multiple choice (every ``*_mc_acc`` metric). Generative metrics sit at 0 for models of held-out perplexity
~10-200, so every domain has an lm-eval style log-likelihood task: an item is a prompt and ``mc_choices`` (4)
candidate continuations, the true one and distractors drawn (seeded) from *other* test records of the same kind.
The model picks the candidate with the highest *unnormalised* total log-probability given the prompt
(``bts.eval.metrics.continuation_logprobs``); an item earns 1 when the truth wins, 1/m when it is one of m tied
maxima, else 0 (``multiple_choice_credit``), so a model that cannot tell the candidates apart scores exactly chance
(100 / ``mc_choices``); the truth also sits at a seeded random position. Distractors are distinct from the truth
and from each other, never the target of a few-shot example in the prompt, and are drawn among the ``mc_near``
(3) pool entries closest in token length to the truth (ties in seeded random order), so the length prior of the
unnormalised score carries little signal. Where the training document ends after the candidate (math answers,
translations), the candidate is scored with the EOS that ends the document, so a prefix of the truth ("1" for
"12") is not a free win. Candidate tokens are the tokens of ``prompt + candidate`` after those of the prompt (as
the model saw the text in training; the prompt is cut before the whitespace that leads the candidate). Every
candidate of an item sees the same (left-truncated) context. By default (``mc_shared_prefix``) an item is one
packed row, the context once and then every candidate, each candidate at the positions it would have after the
context and attending to the context and to itself only (``bts.core.tree_attention``): the same scores up to
round-off for 2.3-3.3x fewer tokens. A model without ``forward_tree`` (expert routing, whose router reads the whole
row) gets one pad-free row per candidate, batched across items among rows of equal length. The length-normalised
variant (log-probability per UTF-8 byte of the candidate, lm-eval's ``acc_norm``) is reported in ``extra`` as
``*_mc_acc_norm``.

Teacher-forced spans (``code_next_line_em``, ``general_next_word_acc``): one forward pass per document; a span
(line, word) is a hit when every one of its tokens is the argmax given the true prefix
(``bts.eval.metrics.span_exact_matches``). The per-item cell of such a metric is one document: its hits over its
scored spans, so the metric is the micro average over spans.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from bts.core import tree_attention
from bts.core.io import BTSError
from bts.core.tree_attention import TreeRows
from bts.eval.metrics import (
    char_to_token_spans,
    continuation_logprobs,
    multiple_choice_accuracy,
    multiple_choice_credit,
    span_exact_matches,
)
from bts.eval.tasks.base import Context, TaskInfo, TaskOutput

MC_COMMON = ("Unnormalised sum log-prob of each candidate given the prompt, argmax, ties split (1/m credit); "
             "distractors are seeded, distinct, among the `mc_near` pool entries closest in token length; truth at "
             "a seeded position.")


def norm_extras(tasks: Mapping[str, TaskInfo]) -> dict[str, TaskInfo]:
    """The ``<name>_norm`` (acc_norm) extra metric of every multiple-choice metric of ``tasks``."""
    return {
        f"{name}_norm": TaskInfo(
            info.group, info.domain, info.label.replace("acc.", "acc_norm"),
            f"{name} with length-normalised candidate scores (total log-prob / UTF-8 bytes of the candidate text, "
            "lm-eval's acc_norm; not in avg).", chance=info.chance, parent=name, scoring="mc")
        for name, info in tasks.items() if info.scoring == "mc"
    }


@dataclass
class MCItem:
    """One multiple-choice item: a prompt and candidate continuations, ``candidates[answer]`` the true one."""

    context: list[int]
    """Prompt token ids (doc start, few-shot documents, prompt); left-truncated when scored."""
    candidates: list[str]
    """Candidate continuation texts, each with the whitespace that separates it from the prompt."""
    candidate_ids: list[list[int]]
    """Their scored token ids (followed by EOS where the training document ends there)."""
    answer: int
    """Index of the true candidate (seeded random position)."""
    group: str = ""
    """Stratum the distractors come from (math module, language, indentation)."""


def pick_distractors(truth: str, pool: Sequence[str], n: int, rng: random.Random, near: int = 0,
                     key: Callable[[str], object] | None = None,
                     lengths: Callable[[list[str]], list[int]] | None = None) -> list[str] | None:
    """``n`` entries of ``pool`` whose ``key`` (default: the string) differs from the truth's and from each other's
    (the first entry of each key is kept), drawn with ``rng`` among the ``max(near, n)`` closest in length to
    ``truth`` (the whole pool when ``near`` is 0; equal distances in random order). ``lengths`` maps a list of
    strings to their lengths (default: characters; the suite uses tokens). None when fewer than ``n`` such
    entries exist. Deterministic for a given ``rng`` state and pool order."""
    key = key or (lambda x: x)
    seen = {key(truth)}
    uniq: list[str] = []
    for c in pool:
        k = key(c)
        if c and k not in seen:
            seen.add(k)
            uniq.append(c)
    if n < 0 or len(uniq) < n:
        return None
    rng.shuffle(uniq)
    if near > 0:
        n_truth, *n_uniq = (lengths or (lambda xs: [len(x) for x in xs]))([truth, *uniq])
        dist = {c: abs(m - n_truth) for c, m in zip(uniq, n_uniq)}
        uniq.sort(key=dist.__getitem__)  # stable: ties keep the random order
        uniq = uniq[: max(near, n)]
    return rng.sample(uniq, n)


def token_lengths(ctx: Context, prefix: str = "", suffix: str = "") -> Callable[[list[str]], list[int]]:
    """Cached, batch-encoded ``[len(encode(prefix + s + suffix)) for s in strings]``: the length measure of the
    distractor matching (tokens, as the candidates are scored)."""
    cache: dict[str, int] = {}

    def lengths(strings: list[str]) -> list[int]:
        new = list(dict.fromkeys(x for x in strings if x not in cache))
        if new:
            enc = ctx.tok([prefix + x + suffix for x in new], add_special_tokens=False)["input_ids"]
            cache.update(zip(new, map(len, enc)))
        return [cache[x] for x in strings]

    return lengths


def continuation_ids(ctx: Context, prompt: str, prompt_ids: list[int], cont: str) -> list[int]:
    """Tokens of ``cont`` as they follow ``prompt`` in ``prompt + cont`` (lm-eval's split of the joint encoding);
    ``cont`` encoded alone when the joint encoding does not start with the prompt's tokens."""
    whole = ctx.encode(prompt + cont)
    n = len(prompt_ids)
    if len(whole) > n and whole[:n] == prompt_ids:
        return whole[n:]
    return ctx.encode(cont)


def mc_item(ctx: Context, rng: random.Random, head: list[int], prompt: str, sep: str, truth: str,
            distractors: Sequence[str], tail: str = "", end_doc: bool = False, group: str = "") -> MCItem | None:
    """Assemble an item: the truth at a seeded random position among the distractors, candidates ``sep + c +
    tail`` (+ EOS when ``end_doc``) after ``head + tokens(prompt)``. None when a candidate would take more than
    half of the context."""
    pos = rng.randrange(len(distractors) + 1)
    texts = [sep + c + tail for c in [*distractors[:pos], truth, *distractors[pos:]]]
    prompt_ids = ctx.encode(prompt)
    ids = [continuation_ids(ctx, prompt, prompt_ids, t) + ([ctx.eos] if end_doc else []) for t in texts]
    context = list(head) + prompt_ids
    if not context or any(not c for c in ids) or max(len(c) for c in ids) > ctx.max_context // 2:
        return None
    return MCItem(context, texts, ids, pos, group)


def score_mc(ctx: Context, items: Sequence[MCItem], desc: str = "mc") -> list[list[float]]:
    """Total log-probability of every candidate of every item given its context (left-truncated so that the
    longest candidate of the item fits ``max_context``; all candidates of an item see the same context).

    One row per candidate, never padded: rows of equal length (from any items) share a forward pass of at most
    ``mc_batch_tokens`` tokens. With ``mc_shared_prefix`` and a model that supports it, one packed row per item
    instead (``_score_packed``)."""
    prepared = []
    for it in items:
        keep = ctx.max_context - max(len(c) for c in it.candidate_ids)
        context = it.context[-keep:] if keep > 0 else []
        if not context:
            raise BTSError(f"{desc}: a candidate does not fit the context of {ctx.max_context} tokens")
        prepared.append((context, it.candidate_ids))
    if shared_prefix(ctx):
        return _score_packed(ctx, prepared, desc)
    rows: dict[int, list[tuple[list[int], int, int, int]]] = {}
    for i, (context, candidates) in enumerate(prepared):
        for j, cand in enumerate(candidates):
            ids = context + cand
            rows.setdefault(len(ids), []).append((ids, len(cand), i, j))
    out = [[0.0] * len(it.candidate_ids) for it in items]
    batches = []
    for length in sorted(rows):
        bs = max(1, ctx.cfg.mc_batch_tokens // length)
        batches += [rows[length][k: k + bs] for k in range(0, len(rows[length]), bs)]
    for batch in ctx.bar(batches, desc):
        x = torch.tensor([r[0] for r in batch], dtype=torch.long, device=ctx.device)
        lp = continuation_logprobs(ctx.model(x), x, [r[1] for r in batch])
        for (_, _, i, j), v in zip(batch, lp.tolist()):
            out[i][j] = v
    return out


def shared_prefix(ctx: Context) -> bool:
    """Whether multiple choice is scored from packed rows (``EvalConfig.mc_shared_prefix`` and the model can)."""
    return ctx.cfg.mc_shared_prefix and tree_attention.model_supports(ctx.model)


def _score_packed(ctx: Context, prepared: Sequence[tuple[list[int], list[list[int]]]], desc: str) -> list[list[float]]:
    """``score_mc`` from one row per item: its context, then every candidate, each candidate at the positions it
    would have after the context and attending to the context and to itself only (``bts.core.tree_attention``).
    Rows, longest first, share a forward pass up to ``mc_batch_tokens`` tokens counting the padding at their ends
    (no real position attends to padding). The mask is built on the model's device from one segment id per token
    (``TreeRows.from_segments``), and each candidate token is scored at its predecessor in the tree."""
    length = [len(context) + sum(map(len, candidates)) for context, candidates in prepared]
    order = sorted(range(len(prepared)), key=lambda i: -length[i])
    batches, k = [], 0
    while k < len(order):
        rows = max(1, ctx.cfg.mc_batch_tokens // length[order[k]])
        batches.append(order[k: k + rows])
        k += rows
    out = [[0.0] * len(cands) for _, cands in prepared]
    for batch in ctx.bar(batches, desc):
        width = length[batch[0]]  # the longest row of the batch
        ids, pos, seg = [], [], []  # per row: tokens, positions, segment (0 context, j + 1 candidate j, -1 padding)
        for i in batch:
            context, candidates = prepared[i]
            n = len(context)
            row_ids, row_pos, row_seg = list(context), list(range(n)), [0] * n
            for j, cand in enumerate(candidates):
                row_ids += cand
                row_pos += range(n, n + len(cand))
                row_seg += [j + 1] * len(cand)
            pad = width - len(row_ids)
            ids.append(row_ids + [ctx.eos] * pad)
            pos.append(row_pos + [0] * pad)
            seg.append(row_seg + [-1] * pad)
        x, seg_t = torch.tensor(ids, device=ctx.device), torch.tensor(seg, device=ctx.device)
        tree = TreeRows.from_segments(torch.tensor(pos, device=ctx.device), seg_t)
        scores = ctx.model.forward_tree(x, tree)
        r_idx, t_idx = (seg_t > 0).nonzero(as_tuple=True)  # every candidate token, in row order
        p_idx = tree.predecessors()[r_idx, t_idx]  # the position whose output predicts it
        tok_lp = torch.log_softmax(scores[r_idx, p_idx].float(), dim=-1).gather(-1, x[r_idx, t_idx, None])[:, 0]
        owner = zip(r_idx.tolist(), (seg_t[r_idx, t_idx] - 1).tolist())
        sums: dict[tuple[int, int], float] = {}
        for (r, j), v in zip(owner, tok_lp.double().cpu().tolist()):  # float64 sums in token order
            sums[batch[r], j] = sums.get((batch[r], j), 0.0) + v
        for (i, j), v in sums.items():
            out[i][j] = v
    return out


def run_mc(ctx: Context, name: str, items: Sequence[MCItem]) -> TaskOutput:
    """Score one multiple-choice metric: its per-item credit (the cell) and, as ``<name>_norm`` in ``extra``, the
    accuracy of the score per UTF-8 byte of the candidate text."""
    logp = score_mc(ctx, items, name)
    answers = [it.answer for it in items]
    norm = [[lp / max(1, len(t.encode("utf-8"))) for lp, t in zip(row, it.candidates)]
            for row, it in zip(logp, items)]
    out = TaskOutput()
    out.formats["mc_scoring"] = ("shared prefix: one packed row per item" if shared_prefix(ctx)
                                 else "one row per candidate")
    out.add_cell(name, multiple_choice_credit(logp, answers), [1] * len(items))
    out.extra[f"{name}_norm"] = multiple_choice_accuracy(norm, answers)
    return out


def span_hits(ctx: Context, records: Sequence[dict], spans_fn, desc: str) -> tuple[list[int], list[int]]:
    """Teacher-forced greedy exact match of the character spans ``spans_fn(text)`` (all but the first span are
    scored; spans must fit the context): per record with at least one scored span, (hits, scored spans).

    With ``EvalConfig.span_batch_tokens`` > 0, documents (longest first) share forward passes, right-padded to the
    longest row: every method scores causally, so a position never sees the padding after it and the scores of a
    document's own positions are those of its own pass (up to the rounding of another batch shape)."""
    docs = []
    for rec in records:
        text = str(rec["text"])
        enc = ctx.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = ctx.prefix + list(enc["input_ids"])
        shift = len(ctx.prefix)
        tok_spans = char_to_token_spans(enc["offset_mapping"], spans_fn(text))[1:]
        tok_spans = [(a + shift, b + shift) for a, b in (s for s in tok_spans if s is not None)]
        tok_spans = [(a, b) for a, b in tok_spans if a >= 1 and b <= ctx.seq_len]
        if tok_spans:
            docs.append((ids[: max(b for _, b in tok_spans)], tok_spans))
    results: list[list[bool] | None] = [None] * len(docs)
    budget = ctx.cfg.span_batch_tokens
    if budget <= 0:
        for i, (ids, spans) in enumerate(ctx.bar(docs, desc)):
            results[i] = span_exact_matches(ctx.scores(ids), torch.tensor(ids, device=ctx.device), spans)
    else:
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i][0]))
        batches, k = [], 0
        while k < len(order):  # rows of at most the longest row's length, up to `budget` padded tokens
            rows = max(1, budget // len(docs[order[k]][0]))
            batches.append(order[k: k + rows])
            k += rows
        for batch in ctx.bar(batches, desc):
            width = len(docs[batch[0]][0])
            x = torch.full((len(batch), width), ctx.eos, dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, : len(docs[i][0])] = torch.tensor(docs[i][0])
            x = x.to(ctx.device)
            scores = ctx.model(x)
            for r, i in enumerate(batch):
                n = len(docs[i][0])
                results[i] = span_exact_matches(scores[r, :n], x[r, :n], docs[i][1])
    hits = [sum(res) for res in results]
    return hits, [len(res) for res in results]


def run_span(ctx: Context, name: str, records: Sequence[dict], spans_fn) -> TaskOutput:
    """A span metric as a cell over documents; ``info.items[name]`` = scored spans, ``<name>_docs`` = documents."""
    hits, totals = span_hits(ctx, records, spans_fn, name)
    out = TaskOutput()
    out.add_cell(name, hits, totals, count=sum(totals))
    out.counts[f"{name}_docs"] = len(totals)
    return out
