"""Metrics of the evaluation suite against hand-computed values."""

from __future__ import annotations

import math
import random

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
from bts.eval.testing import tiny_tokenizer
from bts.training.perplexity import DomainPerplexity, token_nll


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


# --- chrF / BLEU (sacreBLEU) -----------------------------------------------------------------------------------
# Corpus with short strings (below the 6-gram order), identical pairs, whitespace-only differences and no match.
CORPUS = [
    ("hello", "hello"),
    ("abc", "abd"),
    ("the cat sat", "the cat sat"),
    ("the cat is on the mat", "a cat is on the mat"),
    ("Opslaan item", "Opslaan"),
    ("x", "yz"),
    ("", "Goedemorgen"),
    ("Hallo  wereld", "Hallo wereld!"),
]


def test_chrf_hand_computed():
    # identical strings score 100 even when shorter than the 6-gram order (only orders with n-grams count)
    assert chrf(["hello"], ["hello"]) == pytest.approx(100.0, abs=1e-9)
    assert chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0, abs=1e-9)
    # "abc" vs "abd": orders 1-3 have n-grams on both sides; P = R = (2/3 + 1/2 + 0) / 3 = 7/18, F2 = 7/18
    assert chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18, abs=1e-9)
    # "ab" vs "abc": order 1 P=1, R=2/3; order 2 P=1, R=1/2 -> P=1, R=7/12, F2 = 5PR / (4P + R)
    p, r = 1.0, 7 / 12
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r), abs=1e-9)
    assert chrf(["xyz"], ["abc"]) == 0.0
    assert chrf([], []) == 0.0


def test_chrf_agrees_with_sacrebleu_sentence_scores_and_own_statistics():
    """Three routes to the same numbers: sacreBLEU's corpus score (``chrf``), its sentence-level API on single
    pairs, and this package's own n-gram statistics summed over the corpus (``chrf_from_statistics``)."""
    import sacrebleu

    for hyp, ref in CORPUS:
        sentence = sacrebleu.sentence_chrf(hyp, [ref]).score
        assert chrf([hyp], [ref]) == pytest.approx(sentence, abs=1e-6), (hyp, ref)
        assert chrf_from_statistics(chrf_statistics([hyp], [ref])[0]) == pytest.approx(sentence, abs=1e-6)
    hyps, refs = [h for h, _ in CORPUS], [r for _, r in CORPUS]
    assert chrf_from_statistics(chrf_statistics(hyps, refs).sum(0)) == pytest.approx(chrf(hyps, refs), abs=1e-6)
    # a corpus score is not the mean of sentence scores
    mean_sentence = sum(sacrebleu.sentence_chrf(h, [r]).score for h, r in CORPUS) / len(CORPUS)
    assert abs(chrf(hyps, refs) - mean_sentence) > 1.0


def test_chrf_statistics_random_corpora():
    import random

    rng = random.Random(0)
    alphabet = "abcde fghij"
    for _ in range(100):
        n = rng.randint(1, 5)
        preds = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(n)]
        refs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(n)]
        stats = chrf_statistics(preds, refs)
        assert stats.shape == (n, 6, 3)
        assert chrf_from_statistics(stats.sum(0)) == pytest.approx(chrf(preds, refs), abs=1e-6), (preds, refs)


def test_bleu_hand_computed_and_sentence_api():
    import sacrebleu

    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0, abs=1e-9)
    # equal lengths (no brevity penalty); clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> geometric mean
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    assert bleu([hyp], [ref]) == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    sentence = sacrebleu.BLEU(effective_order=False)  # corpus BLEU does not use effective order
    for h, r in CORPUS:
        assert bleu([h], [r]) == pytest.approx(sentence.sentence_score(h, [r]).score, abs=1e-6), (h, r)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        bleu(["a", "b"], ["a"])


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



def _char_to_token_spans_reference(offsets, char_spans):
    """The definition, by a scan of every token per span (what the bisection must reproduce)."""
    out, prev_end = [], 0
    for cs, ce in char_spans:
        idx = [i for i, (s, e) in enumerate(offsets) if e > s and s < ce and e > cs]
        ok = idx and offsets[idx[0]][0] >= prev_end and offsets[idx[-1]][1] <= ce and idx[-1] + 1 - idx[0] == len(idx)
        out.append((idx[0], idx[-1] + 1) if ok else None)
        prev_end = ce
    return out


@pytest.mark.parametrize("seed", range(40))
def test_char_to_token_spans_matches_the_scan(seed):
    rng = random.Random(seed)
    offsets, pos = [], 0
    for _ in range(rng.randint(0, 60)):
        kind = rng.random()
        if kind < 0.1:
            offsets.append((0, 0))  # a special token
        elif kind < 0.2:
            offsets.append((pos, pos))  # zero-width
        else:
            width = rng.randint(1, 4)
            start = max(0, pos - rng.randint(0, 1)) if kind < 0.3 else pos  # some tokens overlap the previous one
            offsets.append((start, start + width))
            pos = start + width
    if seed % 4 == 3 and len(offsets) > 2:  # offsets out of order: the scan fallback
        rng.shuffle(offsets)
    text_len = max([e for _, e in offsets] + [1])
    cuts = sorted(rng.sample(range(text_len + 1), min(text_len + 1, 2 * rng.randint(0, 10))))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
    assert char_to_token_spans(offsets, spans) == _char_to_token_spans_reference(offsets, spans)

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
