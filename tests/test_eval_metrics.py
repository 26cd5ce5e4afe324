"""Metrics of the evaluation suite against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bts.eval.metrics import (
    bleu,
    char_to_token_spans,
    chrf,
    chrf_from_statistics,
    chrf_statistics,
    continuation_logprobs,
    line_char_spans,
    math_exact_match,
    multiple_choice_accuracy,
    multiple_choice_credit,
    normalize_math_answer,
    pass_at_k,
    span_exact_matches,
    word_char_spans,
)
from bts.eval.perplexity import DomainPerplexity, token_nll
from bts.eval.testing import tiny_tokenizer


# --- perplexity ------------------------------------------------------------------------------------------------
def test_perplexity_of_known_distributions():
    V = 10
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    uniform = torch.zeros(1, 5, V)
    m = DomainPerplexity()
    m.update(token_nll(uniform, ids))
    assert float(m.compute()) == pytest.approx(V, rel=1e-5)  # uniform over V tokens -> ppl V

    # p(true next token) = 1/2 at every position -> ppl 2, whatever the other tokens get
    logp = torch.full((1, 5, V), math.log(0.5 / (V - 1)))
    for t in range(4):
        logp[0, t, ids[0, t + 1]] = math.log(0.5)
    m = DomainPerplexity()
    m.update(token_nll(logp, ids))
    assert float(m.compute()) == pytest.approx(2.0, rel=1e-5)

    # accumulated over updates: exp(mean NLL over all tokens) = exp((4*log 2 + 4*log 10) / 8) = sqrt(20)
    m.update(token_nll(uniform, ids))
    assert float(m.compute()) == pytest.approx(math.sqrt(20), rel=1e-5)


# --- math exact match ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, norm",
    [
        ("5", "5"), (" 5.\n", "5"), ("5.0", "5"), ("05", "5"), ("+5", "5"), ("-0", "0"), ("-3/4", "-3/4"),
        ("0.5", "1/2"), ("2/4", "1/2"), ("1e3", "1000"), ("x**2 + 3", "x**2+3"), ("2, 3, 5", "2,3,5"),
        ("True", "True"), ("\n\n 7 \nAnswer: 8", "7"), ("", ""), ("1/0", "1/0"), ("3.14.", "157/50"),
    ],
)
def test_normalize_math_answer(raw, norm):
    assert normalize_math_answer(raw) == norm


def test_math_exact_match():
    preds = ["5.0", "1/2", "x + 1", "7", "-2"]
    refs = ["5", "0.5", "x+1", "8", "2"]
    assert math_exact_match(preds, refs) == pytest.approx(60.0)
    assert math_exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        math_exact_match(["1"], [])


# --- chrF / BLEU ---------------------------------------------------------------------------------------------
def _chrf_by_hand(hyp: str, ref: str, n_order: int = 6, beta: float = 2.0) -> float:
    """Independent implementation of torchmetrics' chrF: mean over orders 1..6 of the character n-gram F-beta
    (whitespace removed; an order with no n-grams scores 0)."""
    from collections import Counter

    h, r = hyp.replace(" ", ""), ref.replace(" ", "")
    total = 0.0
    for n in range(1, n_order + 1):
        hc = Counter(h[i:i + n] for i in range(len(h) - n + 1))
        rc = Counter(r[i:i + n] for i in range(len(r) - n + 1))
        match = sum((hc & rc).values())
        p = match / sum(hc.values()) if hc else 0.0
        rr = match / sum(rc.values()) if rc else 0.0
        total += (1 + beta**2) * p * rr / (beta**2 * p + rr) if (p + rr) > 0 else 0.0
    return 100.0 * total / n_order


def test_chrf_hand_computed():
    # "abc" vs "abd": unigrams F=2/3, bigrams F=1/2, higher orders 0 -> (2/3 + 1/2) / 6 = 7/36
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 36, abs=1e-3)
    assert chrf(["hello"], ["hello"]) == pytest.approx(100 * 5 / 6, abs=1e-3)  # no 6-grams in 5 chars
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0, abs=1e-3)
    for hyp, ref in [("the cat is on the mat", "a cat is on the mat"), ("Opslaan item", "Opslaan")]:
        assert chrf([hyp], [ref]) == pytest.approx(_chrf_by_hand(hyp, ref), abs=1e-3)
    assert chrf([], []) == 0.0


def test_chrf_matches_torchmetrics_documented_value():
    # torchmetrics' CHRFScore docstring: chrF++ (its default n_word_order=2) of this example is 0.8640
    refs = [["there is a cat on the mat", "a cat is on the mat"]]
    assert chrf(["the cat is on the mat"], refs, n_word_order=2) == pytest.approx(86.40, abs=0.005)


def test_chrf_statistics_reproduce_the_corpus_score():
    """Summed per-pair statistics give torchmetrics' corpus chrF (resampling pairs needs no n-gram recount),
    including its rule that a pair without any match adds no reference n-grams."""
    import random

    rng = random.Random(0)
    alphabet = "abcde fghij"
    for _ in range(100):
        n = rng.randint(1, 5)
        preds = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(n)]
        refs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(n)]
        stats = chrf_statistics(preds, refs)
        assert stats.shape == (n, 6, 3)
        assert chrf_from_statistics(stats.sum(0)) == pytest.approx(chrf(preds, refs), abs=1e-4), (preds, refs)
    preds, refs = ["Hallo wereld", "", "xyz"], ["Hallo wereld!", "Goedemorgen", "abc"]
    assert chrf_statistics(preds, refs)[1:, :, 2].sum() == 0  # no match: reference n-grams left out
    assert chrf_from_statistics(chrf_statistics(preds, refs).sum(0)) == pytest.approx(chrf(preds, refs), abs=1e-4)


def test_bleu():
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    assert bleu(["dog"], ["the cat is on the mat"]) == 0.0


# --- teacher-forced span exact match ----------------------------------------------------------------------------
def test_span_exact_matches():
    ids = torch.tensor([0, 3, 4, 5, 6])
    V = 8
    scores = torch.zeros(5, V)
    # predictions for positions 1..4: 3 (right), 4 (right), 1 (wrong), 6 (right)
    for t, p in enumerate([3, 4, 1, 6]):
        scores[t, p] = 1.0
    assert span_exact_matches(scores, ids, [(1, 3), (2, 4), (4, 5), (1, 5)]) == [True, False, True, False]
    with pytest.raises(ValueError):
        span_exact_matches(scores, ids, [(0, 2)])


def test_char_spans():
    assert word_char_spans("Hi, the cat.") == [(0, 2), (4, 7), (8, 11)]
    text = "def f(x):\n\n    return x\n  \n"
    assert [text[a:b] for a, b in line_char_spans(text)] == ["def f(x):", "return x"]


def test_char_to_token_spans_with_bpe():
    tok = tiny_tokenizer(["def f(x):\n    return x + 1\n"] * 20 + ["the cat sat on the mat"] * 20, vocab_size=300)
    text = "def f(x):\n    return x + 1\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = char_to_token_spans(enc["offset_mapping"], line_char_spans(text))
    assert all(s is not None for s in spans)
    a, b = spans[1]
    assert tok.decode(enc["input_ids"][a:b]).strip() == "return x + 1"
    # a span that shares a token with its neighbour cannot be scored alone
    assert char_to_token_spans([(0, 4), (4, 8)], [(0, 2), (2, 6)]) == [None, None]
    assert char_to_token_spans([(0, 2), (2, 6)], [(0, 2), (3, 6)]) == [(0, 1), (1, 2)]


def test_pass_at_k():
    assert pass_at_k([1, 1, 1, 1], [1, 0, 0, 1], 1) == pytest.approx(50.0)
    assert pass_at_k([10], [3], 1) == pytest.approx(30.0)  # unbiased estimator: c/n for k=1
    assert pass_at_k([5], [1], 2) == pytest.approx(40.0)  # 1 - C(4,2)/C(5,2)
    assert pass_at_k([], [], 1) == 0.0


# --- log-likelihood multiple choice -------------------------------------------------------------------------------
def test_continuation_logprobs_hand_computed():
    V = 4
    ids = torch.tensor([[0, 1, 2, 3], [0, 2, 2, 1]])
    probs = torch.full((2, 4, V), 0.1)
    # row 0: p(1|pos0)=0.4, p(2|pos1)=0.5, p(3|pos2)=0.7 (the rest spread evenly)
    for b, t, tok, p in [(0, 0, 1, 0.4), (0, 1, 2, 0.5), (0, 2, 3, 0.7), (1, 1, 2, 0.25), (1, 2, 1, 0.6)]:
        probs[b, t] = (1 - p) / (V - 1)
        probs[b, t, tok] = p
    scores = probs.log() + 3.0  # logits: any shift per position gives the same log-probabilities
    got = continuation_logprobs(scores, ids, [2, 1])
    assert got.dtype == torch.float64
    assert got[0].item() == pytest.approx(math.log(0.5) + math.log(0.7), abs=1e-6)  # last 2 tokens of row 0
    assert got[1].item() == pytest.approx(math.log(0.6), abs=1e-6)  # last token of row 1
    assert continuation_logprobs(scores, ids, [3, 3])[0].item() == pytest.approx(math.log(0.4 * 0.5 * 0.7), abs=1e-6)
    for bad in ([0, 1], [4, 1], [1]):
        with pytest.raises(ValueError):
            continuation_logprobs(scores, ids, bad)
    # uniform scores: equal token counts give bit-identical sums, whatever the row length
    flat = continuation_logprobs(torch.zeros(2, 9, 7), torch.randint(0, 7, (2, 9)), [3, 3])
    assert flat[0].item() == flat[1].item() == pytest.approx(-3 * math.log(7), abs=1e-5)
    short = continuation_logprobs(torch.zeros(1, 5, 7), torch.randint(0, 7, (1, 5)), [3])
    assert short[0].item() == flat[0].item()


def test_multiple_choice_credit():
    scores = [[-1.0, -2.0, -3.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, -1.0, -2.0]]
    assert multiple_choice_credit(scores, [0, 1, 2, 0]) == [1.0, 0.5, 1 / 3, 0.0]
    assert multiple_choice_accuracy(scores, [0, 1, 2, 0]) == pytest.approx(100 * (1 + 0.5 + 1 / 3) / 4)
    assert multiple_choice_credit([], []) == [] and multiple_choice_accuracy([], []) == 0.0


def test_multiple_choice_accuracy_splits_ties():
    assert multiple_choice_accuracy([[-1.0, -2.0, -3.0, -4.0]], [0]) == 100.0
    assert multiple_choice_accuracy([[-1.0, -2.0, -3.0, -4.0]], [1]) == 0.0
    assert multiple_choice_accuracy([[0.0, 0.0, 0.0, 0.0]], [3]) == 25.0  # all tied: exactly chance
    assert multiple_choice_accuracy([[-1.0, -1.0, -5.0, -5.0]], [1]) == 50.0  # two tied maxima
    assert multiple_choice_accuracy([[-1.0, -1.0, -5.0, -5.0]], [2]) == 0.0
    # mean over items; independent of where the truth is when everything ties
    scores = [[-2.0, -2.0, -2.0, -2.0]] * 4
    assert multiple_choice_accuracy(scores, [0, 1, 2, 3]) == multiple_choice_accuracy(scores, [0, 0, 0, 0]) == 25.0
    assert multiple_choice_accuracy([[-1.0, -3.0], [-3.0, -1.0], [0.0, 0.0]], [0, 0, 1]) == pytest.approx(50.0)
    assert multiple_choice_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        multiple_choice_accuracy([[0.0, 1.0]], [])
    with pytest.raises(ValueError):
        multiple_choice_accuracy([[0.0, 1.0]], [2])
