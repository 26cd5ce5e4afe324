"""End-to-end tests of the evaluation suite (bts.eval.suite) on tiny models and synthetic records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bts.eval.interface import HFLanguageModel, greedy_or_sample_uncached
from bts.eval.suite import (
    TASK_GROUPS,
    TASKS,
    EvalConfig,
    evaluate,
    infer_pair_format,
    math_prompt,
    pack_blocks,
    resolve_tasks,
    select_humaneval,
    template_pair_format,
)
from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer
from bts.io import BTSError
from conftest import tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = EvalConfig(ppl_blocks=2, math_items=4, translation_items=4, code_items=3, humaneval_items=2,
                   humaneval_max_new_tokens=8, general_items=3, math_max_new_tokens=4,
                   translation_max_new_tokens=6)


@pytest.fixture(scope="module")
def data():
    return synthetic_records(40)


@pytest.fixture(scope="module")
def tok(data):
    return tiny_tokenizer(all_texts(data), vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    return HFLanguageModel(tiny_llama(0, vocab=len(tok)))


class NgramOracle(nn.Module):
    """A 'model' that has memorised documents: it predicts the token that followed the longest matching suffix
    (up to ``k`` tokens) of its input in the memorised token streams. Perfect teacher on those documents."""

    def __init__(self, docs: list[list[int]], vocab: int, k: int = 48):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab, self.k = vocab, k
        self.table: dict[tuple, int] = {}
        for ids in docs:
            for i in range(len(ids) - 1):
                for n in range(1, min(k, i + 1) + 1):
                    self.table.setdefault(tuple(ids[i - n + 1: i + 1]), ids[i + 1])

    def forward(self, input_ids):
        B, T = input_ids.shape
        out = torch.full((B, T, self.vocab), -10.0)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(T):
                nxt = 0
                for n in range(min(self.k, t + 1), 0, -1):
                    hit = self.table.get(tuple(row[t - n + 1: t + 1]))
                    if hit is not None:
                        nxt = hit
                        break
                out[b, t, nxt] = 10.0
        return out

    def generate(self, input_ids, max_new_tokens, eos_token_id=None, do_sample=False, temperature=1.0,
                 generator=None):
        return greedy_or_sample_uncached(self, input_ids, max_new_tokens, eos_token_id, do_sample, temperature,
                                         generator)


def _oracle(data, tok, problems):
    eos = tok.eos_token_id
    docs = []
    for recs in data.values():
        for r in recs:
            docs.append(r["text"])
    for r in data["multilingual"]:  # the X->English documents the suite renders from its template
        pre, mid, suf = template_pair_format(EvalConfig().translation_template, r["lang"], src_is_en=False)
        docs.append(pre + r["xx"] + mid + r["en"] + suf)
    for p in problems:
        docs.append(p["prompt"].rstrip() + "\n" + p["canonical_solution"].lstrip("\n"))
    streams = [[eos] + tok(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]
    return NgramOracle(streams, len(tok))


def test_schema_and_determinism(model, tok, data):
    r1 = evaluate(model, tok, cfg=SMALL, data=data, progress=False)
    assert set(r1) >= {"ppl", "tasks", "avg", "extra", "info"}
    assert set(r1["ppl"]) == {"general", "code", "math", "multilingual"}
    assert list(r1["tasks"]) == list(TASKS)
    assert all(0.0 <= v <= 100.0 for v in r1["tasks"].values())
    assert r1["avg"] == pytest.approx(sum(r1["tasks"].values()) / len(TASKS))
    # a random model over a vocab of V tokens has perplexity of the order of V
    assert all(len(tok) / 4 < p < len(tok) * 4 for p in r1["ppl"].values())
    assert set(r1["extra"]) == {"translation_s_bleu", "translation_t_bleu"}
    json.dumps(r1)  # serialisable
    r2 = evaluate(model, tok, cfg=SMALL, data=data, progress=False)
    assert r1["ppl"] == r2["ppl"] and r1["tasks"] == r2["tasks"]


@pytest.fixture(scope="module", params=["tiny", "project"])
def any_tok(request, data, tok):
    """The test tokenizer, and the project's own tokenizer builder (digits split individually) when present."""
    if request.param == "tiny":
        return tok
    build = pytest.importorskip("bts.data.tokenizer").build_tokenizer
    return build(all_texts(data), vocab_size=400, min_frequency=1)


def test_oracle_model_scores_high(any_tok, data):
    """A model that has memorised the documents must score (close to) 100 on every downstream task: checks that
    prompts, stop strings, span mapping and answer extraction line up with the training-document format."""
    from bts.eval.humaneval import read_problems

    tok = any_tok

    cfg = EvalConfig(ppl_blocks=2, math_items=6, translation_items=7, code_items=4, humaneval_items=2,
                     general_items=3, humaneval_max_new_tokens=120, max_context=512)
    problems = select_humaneval(read_problems(), 2, "shortest", 0, length=lambda s: len(tok(s)["input_ids"]))
    oracle = _oracle(data, tok, problems)
    r = evaluate(oracle, tok, tasks=("math", "translation", "code", "general"), cfg=cfg, data=data,
                 progress=False, seq_len=128)
    t = r["tasks"]
    assert t["math_em"] == 100.0
    assert t["translation_s_chrf"] > 95 and t["translation_t_chrf"] > 95, r["info"]["formats"]
    assert t["code_next_line_em"] == 100.0
    assert t["humaneval_pass1"] == 100.0
    assert t["general_next_word_acc"] > 90.0


def test_task_selection(model, tok, data):
    r = evaluate(model, tok, tasks="math,code_next_line_em", cfg=SMALL, data=data, progress=False)
    assert r["ppl"] == {} and list(r["tasks"]) == ["math_em", "code_next_line_em"]
    r = evaluate(model, tok, tasks=["ppl"], cfg=SMALL, data=data, progress=False)
    assert r["tasks"] == {} and r["avg"] is None and len(r["ppl"]) == 4
    assert resolve_tasks("ppl,translation") == (True, list(TASK_GROUPS["translation"]))
    with pytest.raises(BTSError, match="unknown task 'mmlu'"):
        resolve_tasks("ppl,mmlu")
    with pytest.raises(BTSError, match="no 'math' records"):
        evaluate(model, tok, tasks="math", cfg=SMALL, data={"code": data["code"]}, progress=False)


def test_restores_train_mode(model, tok, data):
    model.train()
    evaluate(model, tok, tasks="general", cfg=SMALL, data=data, progress=False)
    assert model.training
    model.eval()


def test_math_prompt_and_pair_formats():
    rec = {"text": "Question: Solve 2*x = 4 for x.\nAnswer: 2", "question": "Solve 2*x = 4 for x.", "answer": "2"}
    assert math_prompt(rec) == ("Question: Solve 2*x = 4 for x.\nAnswer:", "2")
    assert math_prompt({"text": "odd", "question": "q?", "answer": "7"}) == ("Question: q?\nAnswer:", "7")
    recs = [{"en": f"Save {i}", "xx": f"Opslaan {i}", "text": f"English: Save {i}\nDutch: Opslaan {i}"}
            for i in range(5)]
    assert infer_pair_format(recs, src_is_en=True) == ("English: ", "\nDutch: ", "")
    assert infer_pair_format(recs, src_is_en=False) is None  # never seen X before English
    both = recs + [{"en": f"Go {i}", "xx": f"Ga {i}", "text": f"Dutch: Ga {i}\nEnglish: Go {i}"} for i in range(3)]
    assert infer_pair_format(both, src_is_en=False) == ("Dutch: ", "\nEnglish: ", "")
    assert infer_pair_format(both, src_is_en=True) == ("English: ", "\nDutch: ", "")
    odd = [{"en": f"a{i}", "xx": f"b{i}", "text": f"#{i}: a{i} | b{i}"} for i in range(4)]  # no common layout
    assert infer_pair_format(odd, src_is_en=True) is None
    assert template_pair_format("{src_lang}: {src}\n{tgt_lang}: {tgt}", "nl", False) == ("Dutch: ", "\nEnglish: ", "")
    with pytest.raises(BTSError):
        template_pair_format("{tgt} {src}", "nl", True)


def test_pack_blocks():
    docs = [[5, 6, 7], [8, 9], [10]]
    assert pack_blocks(docs, 4, 2, 10) == [[5, 6, 7, 2], [8, 9, 2, 10]]
    assert pack_blocks(docs, 4, 2, 1) == [[5, 6, 7, 2]]
    assert pack_blocks([[5]], 8, 2, 3) == [[5, 2]]  # too short for a block: the partial stream


def test_config_overrides():
    cfg = EvalConfig.from_overrides({"math_items": "5", "humaneval_items": "none", "ppl_domains": "code,math",
                                     "translation_template": "{src} => {tgt}\\n"})
    assert cfg.math_items == 5 and cfg.humaneval_items is None and cfg.ppl_domains == ("code", "math")
    assert cfg.translation_template == "{src} => {tgt}\n"
    with pytest.raises(BTSError, match="unknown EvalConfig field"):
        EvalConfig.from_overrides({"nope": "1"})
    with pytest.raises(BTSError, match="bad value"):
        EvalConfig.from_overrides({"math_items": "x"})
