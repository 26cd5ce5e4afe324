"""End-to-end tests of the evaluation suite (bts.eval.suite) on tiny models and synthetic records."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bts.core.io import BTSError
from bts.core.language_model import HFLanguageModel, greedy_or_sample_uncached
from bts.eval.metrics import normalize_math_answer
from bts.eval.suite import (
    DEFAULT_TASKS,
    EXTRA_METRICS,
    GENERATIVE_TASKS,
    TASK_GROUPS,
    TASKS,
    EvalConfig,
    build_mc_items,
    evaluate,
    infer_pair_format,
    math_prompt,
    pack_blocks,
    pick_distractors,
    resolve_selection,
    resolve_tasks,
    select_humaneval,
    template_pair_format,
)
from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer
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
                   translation_max_new_tokens=6, math_mc_items=4, translation_mc_items=4, code_mc_items=3,
                   general_mc_items=3)
MC_TASKS = ("math_mc_acc", "translation_s_mc_acc", "translation_t_mc_acc", "code_mc_acc", "general_mc_acc")


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


ALL = ("ppl", *TASK_GROUPS)


def test_schema_and_determinism(model, tok, data):
    r1 = evaluate(model, tok, tasks=ALL, cfg=SMALL, data=data, progress=False)
    assert set(r1) >= {"ppl", "tasks", "avg", "extra", "info"}
    assert set(r1["ppl"]) == {"general", "code", "math", "multilingual"}
    assert list(r1["tasks"]) == list(TASKS)
    assert all(0.0 <= v <= 100.0 for v in r1["tasks"].values())
    assert r1["avg"] == pytest.approx(sum(r1["tasks"].values()) / len(TASKS))
    # a random model over a vocab of V tokens has perplexity of the order of V
    assert all(len(tok) / 4 < p < len(tok) * 4 for p in r1["ppl"].values())
    assert set(r1["extra"]) == set(EXTRA_METRICS)
    assert all(TASKS[t].chance == 25.0 for t in MC_TASKS) and all(r1["info"]["items"][t] > 0 for t in MC_TASKS)
    assert set(r1["tasks_ci"]) == set(r1["chance"]) == set(TASKS) and set(r1["ppl_ci"]) == set(r1["ppl"])
    assert set(r1["items"]) == {f"ppl:{d}" for d in r1["ppl"]} | (set(TASKS) - {"translation_s_chrf",
                                                                             "translation_t_chrf"})
    json.dumps(r1)  # serialisable
    r2 = evaluate(model, tok, tasks=ALL, cfg=SMALL, data=data, progress=False)
    r1["info"].pop("seconds"), r2["info"].pop("seconds")
    assert r1 == r2


def test_default_tasks_leave_out_generation():
    """The default run is perplexity + the likelihood / teacher-forced metrics; generation metrics need a name."""
    import inspect

    assert inspect.signature(evaluate).parameters["tasks"].default == DEFAULT_TASKS
    assert set(GENERATIVE_TASKS) == {"math_em", "translation_s_chrf", "translation_t_chrf", "humaneval_pass1"}
    assert resolve_tasks(DEFAULT_TASKS) == (True, [
        "math_mc_acc", "translation_s_mc_acc", "translation_t_mc_acc", "code_next_line_em", "code_mc_acc",
        "general_next_word_acc", "general_mc_acc"])
    assert resolve_selection(DEFAULT_TASKS)[:2] == (True, True)  # perplexity, and after a domain switch
    assert all(TASKS[t].chance == 0.0 for t in GENERATIVE_TASKS)
    assert resolve_tasks("math")[1] == ["math_em", "math_mc_acc"]  # group names still include them
    cfg = EvalConfig()
    assert cfg.ppl_blocks == 128 and cfg.code_items == cfg.general_items == 400
    assert cfg.math_mc_items == cfg.translation_mc_items == cfg.code_mc_items == cfg.general_mc_items == 400


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
                     general_items=3, humaneval_max_new_tokens=120, max_context=512, math_mc_items=8,
                     translation_mc_items=7, code_mc_items=6, general_mc_items=6)
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
    for name in MC_TASKS:  # the memorised continuation beats every distractor
        assert t[name] == 100.0 and r["extra"][f"{name}_norm"] == 100.0, name
        assert r["info"]["items"][name] >= 6, name


def test_task_selection(model, tok, data):
    r = evaluate(model, tok, tasks="math,code_next_line_em", cfg=SMALL, data=data, progress=False)
    assert r["ppl"] == {} and list(r["tasks"]) == ["math_em", "math_mc_acc", "code_next_line_em"]
    r = evaluate(model, tok, tasks="math", cfg=SMALL, data=data, progress=False)
    assert list(r["tasks"]) == ["math_em", "math_mc_acc"] and set(r["extra"]) == {"math_mc_acc_norm"}
    r = evaluate(model, tok, tasks="general_mc_acc_norm", cfg=SMALL, data=data, progress=False)
    assert list(r["tasks"]) == ["general_mc_acc"] and set(r["extra"]) == {"general_mc_acc_norm"}
    assert resolve_tasks("translation_t_mc_acc_norm") == (False, ["translation_t_mc_acc"])
    assert resolve_tasks("translation_s_bleu") == (False, ["translation_s_chrf"])
    assert resolve_tasks("translation_t_bleu") == (False, ["translation_t_chrf"])
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


# --- log-likelihood multiple choice -----------------------------------------------------------------------------
class Uniform(nn.Module):
    """Uniform next-token distribution: every candidate scores -len(tokens) * log(V)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


MC_CFG = EvalConfig(math_mc_items=12, translation_mc_items=14, code_mc_items=10, general_mc_items=10)


def _tie_rule(items, score):
    """Accuracy (%) under the suite's rule: 1/m credit when the truth is among m tied best candidates."""
    total = 0.0
    for it in items:
        s = [score(ids, text) for ids, text in zip(it.candidate_ids, it.candidates)]
        if s[it.answer] == max(s):
            total += 1.0 / s.count(max(s))
    return 100.0 * total / len(items)


def test_uniform_model_scores_the_tie_rule(tok, data):
    """A uniform model prefers the candidates with the fewest tokens and splits ties: its accuracy is exactly
    what the documented rule gives (and exactly chance when all candidates have equally many tokens)."""
    import math

    V = len(tok)
    r = evaluate(Uniform(V), tok, tasks=MC_TASKS, cfg=MC_CFG, data=data, progress=False)
    for name in MC_TASKS:
        items = build_mc_items(name, tok, cfg=MC_CFG, data=data)
        assert len(items) == r["info"]["items"][name] > 0
        expected = _tie_rule(items, lambda ids, text: -len(ids) * math.log(V))
        assert r["tasks"][name] == pytest.approx(expected, abs=1e-9), name
        expected_norm = _tie_rule(items, lambda ids, text: -len(ids) * math.log(V) / len(text.encode()))
        assert r["extra"][f"{name}_norm"] == pytest.approx(expected_norm, abs=1e-9), name


def test_uniform_model_is_at_chance_on_equal_length_candidates():
    """Single-digit answers in one module: every candidate is ' <digit>' + EOS, so a uniform model ties on every
    item and scores exactly 100 / mc_choices."""
    math_recs = [{"text": f"Question: What is {i} mod 10?\nAnswer: {i % 10}", "question": f"What is {i} mod 10?",
                  "answer": str(i % 10), "module": "numbers__mod"} for i in range(60)]
    tok = tiny_tokenizer([r["text"] for r in math_recs] * 5, vocab_size=300)
    items = build_mc_items("math_mc_acc", tok, cfg=MC_CFG, data={"math": math_recs})
    assert len({len(ids) for it in items for ids in it.candidate_ids}) == 1  # the premise: equal lengths
    r = evaluate(Uniform(len(tok)), tok, tasks="math_mc_acc", cfg=MC_CFG, data={"math": math_recs}, progress=False)
    assert r["tasks"]["math_mc_acc"] == 25.0 and r["extra"]["math_mc_acc_norm"] == 25.0
    r = evaluate(Uniform(len(tok)), tok, tasks="math_mc_acc", cfg=EvalConfig(math_mc_items=12, mc_choices=3),
                 data={"math": math_recs}, progress=False)
    assert r["tasks"]["math_mc_acc"] == pytest.approx(100 / 3) == r["chance"]["math_mc_acc"]


def test_mc_items_distinct_deterministic_and_stratified(tok, data):
    by_text = {r["text"]: r for r in data["math"]}
    for name in MC_TASKS:
        items = build_mc_items(name, tok, cfg=MC_CFG, data=data)
        again = build_mc_items(name, tok, cfg=MC_CFG, data=data)
        other = build_mc_items(name, tok, cfg=EvalConfig(**{**MC_CFG.to_dict(), "seed": 1}), data=data)
        assert items == again, name  # deterministic for a seed
        assert [it.candidates for it in items] != [it.candidates for it in other], name
        n_items = {"math": MC_CFG.math_mc_items, "translation": MC_CFG.translation_mc_items,
                   "code": MC_CFG.code_mc_items, "general": MC_CFG.general_mc_items}[TASKS[name].group]
        assert len(items) == n_items, name
        positions = [it.answer for it in items]
        assert len(set(positions)) > 1, name  # the truth is not always in the same place
        for it in items:
            assert len(it.candidates) == len(it.candidate_ids) == 4
            assert len({c.strip() for c in it.candidates}) == 4, it.candidates  # distinct, truth included
            assert all(ids for ids in it.candidate_ids)
            ends_doc = name.startswith(("math", "translation"))
            assert all((ids[-1] == tok.eos_token_id) == ends_doc for ids in it.candidate_ids)
    # math: the truth is the record's answer, distractors are answers of other problems of the same module
    answers = {str(r["answer"]) for r in data["math"]}
    for it in build_mc_items("math_mc_acc", tok, cfg=MC_CFG, data=data):
        prompt = tok.decode(it.context).split("</s>")[-1]
        rec = by_text[prompt + it.candidates[it.answer]]
        assert it.group == rec["module"] and {c.strip() for c in it.candidates} <= answers
        assert len({normalize_math_answer(c) for c in it.candidates}) == 4
    # translation: targets in the item's language (X for S, English for T), truth = the record's target
    for name, side in (("translation_s_mc_acc", "xx"), ("translation_t_mc_acc", "en")):
        for it in build_mc_items(name, tok, cfg=MC_CFG, data=data):
            pool = {r[side] for r in data["multilingual"] if r["lang"] == it.group}
            assert {c.strip() for c in it.candidates} <= pool
            src = tok.decode(it.context).split("</s>")[-1]
            rec = [r for r in data["multilingual"] if r["en" if side == "xx" else "xx"] in src]
            assert any(r[side] == it.candidates[it.answer].strip() for r in rec)
    # code: one indentation for all candidates, the truth continues its function
    code_texts = [r["text"] for r in data["code"]]
    for it in build_mc_items("code_mc_acc", tok, cfg=MC_CFG, data=data):
        gap = it.candidates[0][: len(it.candidates[0]) - len(it.candidates[0].lstrip())]
        assert all(c.startswith(gap) and not c[len(gap)].isspace() for c in it.candidates)
        prompt = tok.decode(it.context[1:])
        assert any(t.startswith(prompt + it.candidates[it.answer]) for t in code_texts)
        assert sum(t.startswith(prompt + c) for t in code_texts for c in it.candidates) == 1
    # general: runs of general_mc_words words, the truth continues its paragraph
    gen_texts = [r["text"] for r in data["general"]]
    for it in build_mc_items("general_mc_acc", tok, cfg=MC_CFG, data=data):
        assert all(c.startswith(" ") and len(c.split()) == MC_CFG.general_mc_words for c in it.candidates)
        prompt = tok.decode(it.context[1:])
        assert len(prompt.split()) >= MC_CFG.general_mc_words
        assert any((prompt + it.candidates[it.answer]) in t for t in gen_texts)


def test_mc_distractors_skip_few_shot_targets(tok, data):
    """The one-shot example of a language is in every prompt: its target is never a distractor."""
    for name, side in (("translation_s_mc_acc", "xx"), ("translation_t_mc_acc", "en")):
        for it in build_mc_items(name, tok, cfg=MC_CFG, data=data):
            shot = tok.decode(it.context).split("</s>")[1]  # <eos> shot <eos> prompt
            last = shot.split("\n")[-1]  # "Opslaan 12" (inferred layout) / "English: Save item 12" (template)
            target = last.split(": ", 1)[-1] if side == "en" else last
            assert target in {r[side] for r in data["multilingual"]}
            assert all(c.strip() != target for j, c in enumerate(it.candidates) if j != it.answer)


def test_pick_distractors():
    import random

    pool = ["1", "2", "2", "3", "0.5", "1/2", "10", "100", "-4"]
    got = pick_distractors("2", pool, 3, random.Random(0), key=normalize_math_answer)
    assert len(got) == 3 and "2" not in got and len({normalize_math_answer(x) for x in got}) == 3
    assert got == pick_distractors("2", pool, 3, random.Random(0), key=normalize_math_answer)  # deterministic
    assert pick_distractors("2", ["2", "2", "1"], 2, random.Random(0)) is None  # not enough distinct entries
    assert pick_distractors("0.5", ["1/2", "2/4", "1"], 2, random.Random(0), key=normalize_math_answer) is None
    # near-length: the 3 closest in length to the truth (equal distances in random order)
    words = ["a", "bb", "cc", "dddd", "eeeee", "ffffff", "ggggggg", "hhhhhhhh"]
    for seed in range(5):
        got = pick_distractors("xxxx", words, 3, random.Random(seed), near=3)
        assert set(got) <= {"cc", "bb", "dddd", "eeeee", "ffffff"} and "dddd" in got and "eeeee" in got
    picks = {tuple(sorted(pick_distractors("x", words, 3, random.Random(s)))) for s in range(20)}
    assert len(picks) > 5  # near=0: any 3 of the pool
    # a custom length measure (the suite uses token counts)
    got = pick_distractors("q", ["long string", "tiny", "x" * 50], 1, random.Random(0), near=1,
                           lengths=lambda xs: [len(x.split()) for x in xs])
    assert got in (["tiny"], ["x" * 50])


def test_batched_span_scoring_equals_one_pass_per_document(tok, data):
    """span_batch_tokens > 0 right-pads documents into shared passes: for a causal model (float64, so that batch
    shapes cannot move an argmax) every document's hits equal those of its own pass; an oracle that knows the
    documents gets nearly every span right in both, so the comparison is not vacuous."""
    model = HFLanguageModel(tiny_llama(3, vocab=len(tok)).double())
    cfg = EvalConfig(code_items=12, general_items=12)
    one = evaluate(model, tok, tasks="code_next_line_em,general_next_word_acc", cfg=cfg, data=data, progress=False)
    batched = evaluate(model, tok, tasks="code_next_line_em,general_next_word_acc",
                       cfg=EvalConfig(**{**cfg.to_dict(), "span_batch_tokens": 300}), data=data, progress=False)
    for name in ("code_next_line_em", "general_next_word_acc"):
        assert batched["items"][name] == one["items"][name], name
    oracle = _oracle(data, tok, [])
    runs = [evaluate(oracle, tok, tasks="general_next_word_acc",
                     cfg=EvalConfig(**{**cfg.to_dict(), "span_batch_tokens": n}), data=data, progress=False)
            for n in (0, 300)]
    assert runs[0]["items"] == runs[1]["items"] and runs[1]["tasks"]["general_next_word_acc"] > 90
