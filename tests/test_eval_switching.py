"""Perplexity after a mid-block domain switch (bts.eval.tasks.switching): the blocks, the post-switch scoring, BTM's
posterior over the prefix, the switching claims and tables, and bad settings.

Hermetic: a character tokenizer whose domains write with disjoint alphabets (so a token id names its domain),
hand-written records, tiny random Llama models whose weights are perturbed far from their init (distinct,
non-uniform predictions)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bts.core.io import BTSError
from bts.core.language_model import HFLanguageModel
from bts.data.switching import DEFAULT_TYPES, switch_blocks_of
from bts.eval.stats import cell_value
from bts.eval.suite import EvalConfig, evaluate, resolve_selection
from conftest import perturbed_copy, tiny_llama

ALPHABETS = {"general": "abcdefgh ", "code": "ijklmn()=", "math": "0123456789+", "multilingual": "opqrstuvw"}
CHARS = "".join(ALPHABETS.values())
EOS = 2
L = 32  # block length of these tests: switches at 8, 16, 24


class CharTokenizer:
    """One token per character (ids from 3), EOS = 2; enough of a tokenizer for ``evaluate``."""

    eos_token_id = EOS
    bos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [3 + CHARS.index(c) for c in text]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.encode(text)}

    def __len__(self):
        return 3 + len(CHARS)


def domain_of(token: int) -> str:
    return "eos" if token == EOS else next(d for d, a in ALPHABETS.items() if CHARS[token - 3] in a)


def records(n: int = 9) -> dict[str, list[dict]]:
    """Records of 3..13 characters (a block side needs several of them), one empty record per domain (skipped)."""
    rng = random.Random(7)
    out = {}
    for d, alpha in ALPHABETS.items():
        recs = [{"text": "".join(rng.choice(alpha) for _ in range(rng.randint(3, 13)))} for _ in range(n)]
        out[d] = [*recs[:4], {"text": ""}, *recs[4:]]
    return out


def dense(seed: int, vocab: int):
    """A tiny Llama moved far from its init (noise 0.3 on every weight): ~6 nats per token, spread ~2 nats."""
    return perturbed_copy(tiny_llama(0, vocab=vocab, layers=2), seed, 0.3).eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ blocks
def _by_hand(recs, kind, j_max, seed=0):
    """The blocks of one type rebuilt from the construction's description (not from the module's code)."""
    a, b = kind.split(">")
    tok = CharTokenizer()
    sides = {}
    for side, d in (("prefix", a), ("continuation", b)):
        order = list(range(len(recs[d])))
        random.Random(f"{seed}:switch:{kind}:{side}").shuffle(order)
        stream, starts = [], []
        for _ in range(4):  # a few passes over the seeded order (a side wraps around when it runs out)
            for i in order:
                ids = tok.encode(recs[d][i]["text"])
                if ids:
                    starts.append((len(stream), i))
                    stream += ids + [EOS]
        sides[side] = (stream, starts)
    out = []
    pa = pb = 0  # where each side's next document starts in its stream
    for j in range(j_max):
        p = [8, 16, 24][j % 3]
        stream, starts = sides["prefix"]
        end = next(s for s, _ in starts if s >= pa + p)  # whole documents until at least p tokens
        prefix = stream[end - p: end]
        pa = end
        stream, starts = sides["continuation"]
        cont = stream[pb: pb + L - p]
        pb = next(s for s, _ in starts if s >= pb + L - p)  # the partly used document is not reused
        out.append((prefix + cont, p))
    return out


def test_blocks_are_windows_of_a_packed_stream_switching_at_fixed_positions():
    recs, tok = records(), CharTokenizer()
    blocks = switch_blocks_of(lambda d: recs[d], tok.encode, EOS, L, DEFAULT_TYPES, n_blocks=7, seed=0)
    assert list(blocks) == list(DEFAULT_TYPES) and len(DEFAULT_TYPES) == 12
    for kind, bl in blocks.items():
        a, b = kind.split(">")
        assert [(list(x.ids), x.switch) for x in bl] == _by_hand(recs, kind, 7), kind
        for x in bl:
            p = x.switch
            assert len(x.ids) == L and x.scored == L - p
            assert {domain_of(t) for t in x.ids[:p]} == {a, "eos"} and x.ids[p - 1] == EOS  # a finished A document
            assert domain_of(x.ids[p]) == b and {domain_of(t) for t in x.ids[p:]} <= {b, "eos"}
            first = tok.encode(recs[b][x.continuation_records[0]]["text"])
            assert list(x.ids[p: p + len(first)]) == first[: L - p]  # the continuation starts a document
        assert [x.switch for x in bl] == [8, 16, 24, 8, 16, 24, 8]
        used = [i for x in bl for i in x.continuation_records]
        assert 4 not in used  # the empty record is skipped
    # a type's blocks do not depend on the other types; the seed moves them
    alone = switch_blocks_of(lambda d: recs[d], tok.encode, EOS, L, ["math>code"], n_blocks=7, seed=0)
    assert alone["math>code"] == blocks["math>code"]
    again = switch_blocks_of(lambda d: recs[d], tok.encode, EOS, L, DEFAULT_TYPES, n_blocks=7, seed=0)
    assert again == blocks
    other = switch_blocks_of(lambda d: recs[d], tok.encode, EOS, L, ["math>code"], n_blocks=7, seed=1)
    assert other["math>code"] != blocks["math>code"]


# ------------------------------------------------------------------------------------------------ scoring
def _post_switch_nll(logits: torch.Tensor, ids: list[int], p: int) -> float:
    """Σ_{t >= p} -log softmax(logits[t - 1])[ids[t]] in float64."""
    target = torch.tensor(ids[p:])
    return float(F.cross_entropy(logits[p - 1: L - 1].double(), target, reduction="sum"))


def test_post_switch_scoring_equals_recomputation_from_dense_logits():
    recs, tok = records(), CharTokenizer()
    hf = dense(1, len(tok))
    cfg = EvalConfig(switch_blocks=4, switch_types=("general>code", "math>multilingual", "code>general"))
    r = evaluate(HFLanguageModel(hf), tok, tasks="switch", cfg=cfg, data=recs, progress=False, seq_len=L)
    assert set(r["switch_ppl"]) == {"general>code", "math>multilingual", "code>general", "all"}
    assert r["ppl"] == {} and r["tasks"] == {} and r["info"]["items"]["switch_blocks"] == 12
    pooled_num, pooled_den = [], []
    for kind in cfg.switch_types:
        cell = r["items"][f"switch:{kind}"]
        assert cell["kind"] == "ppl"
        want_num, want_den, whole = [], [], []
        for ids, p in _by_hand(recs, kind, 4):
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([ids])).logits[0]
            want_num.append(_post_switch_nll(logits, ids, p))
            want_den.append(L - p)
            whole.append(float(F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum")))
        np.testing.assert_allclose(cell["num"], want_num, rtol=1e-5)
        assert cell["den"] == want_den == [24, 16, 8, 24]
        assert all(w - n > 1.0 for w, n in zip(whole, want_num))  # the prefix's tokens are not scored
        assert r["switch_ppl"][kind] == cell_value(cell["num"], cell["den"], "ppl")
        lo, hi = r["switch_ppl_ci"][kind]
        assert lo <= r["switch_ppl"][kind] <= hi
        pooled_num += cell["num"]
        pooled_den += cell["den"]
    assert r["items"]["switch:all"] == {"num": pooled_num, "den": pooled_den, "kind": "ppl"}
    assert r["switch_ppl"]["all"] == pytest.approx(math.exp(sum(pooled_num) / sum(pooled_den)))
    # batching does not change a block's score
    one = evaluate(HFLanguageModel(hf), tok, tasks="switch", cfg=EvalConfig(**{**cfg.to_dict(), "ppl_batch_size": 1}),
                   data=recs, progress=False, seq_len=L)
    np.testing.assert_allclose(one["items"]["switch:all"]["num"], pooled_num, rtol=1e-5)


def test_btm_scores_the_continuation_with_the_posterior_over_the_prefix():
    """BTM's posterior at a post-switch position is Bayes' rule over every earlier token of the block, the prefix
    included (BTM paper §3; ``baselines.btm``), recomputed here from the members' own logits."""
    from baselines.btm import BTMEnsemble

    recs, tok = records(), CharTokenizer()
    members = [dense(s, len(tok)) for s in (1, 2, 3)]
    cfg = EvalConfig(switch_blocks=3, switch_types=("general>code", "code>math"))
    r = evaluate(BTMEnsemble(members), tok, tasks="switch", cfg=cfg, data=recs, progress=False, seq_len=L)
    for kind in cfg.switch_types:
        with_prefix, from_switch = [], []
        for ids, p in _by_hand(recs, kind, 3):
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = torch.stack([F.log_softmax(m(input_ids=x).logits[0].double(), -1) for m in members])  # [M,T,V]
            tok_ll = logp[:, :-1].gather(-1, x[0, 1:][None, :, None].expand(3, -1, 1))[..., 0]  # [M, T-1]
            total = total_fresh = 0.0
            for t in range(p, L):  # predict token t from position t - 1
                # the posterior used at position t - 1 has seen tokens 1 .. t - 1 (token 0 has no likelihood)
                post = torch.softmax(tok_ll[:, : t - 1].sum(-1), 0)
                fresh = torch.softmax(tok_ll[:, p: t - 1].sum(-1), 0)  # as if the block started at the switch
                total -= float(torch.logsumexp(torch.log(post) + logp[:, t - 1, ids[t]], 0))
                total_fresh -= float(torch.logsumexp(torch.log(fresh) + logp[:, t - 1, ids[t]], 0))
            with_prefix.append(total)
            from_switch.append(total_fresh)
        np.testing.assert_allclose(r["items"][f"switch:{kind}"]["num"], with_prefix, rtol=1e-5)
        # the prefix's evidence changes the score: scoring the continuation alone would give another number
        assert max(abs(a - b) for a, b in zip(with_prefix, from_switch)) > 0.5


# ------------------------------------------------------------------------------------------------ claims, tables
def _switch_cell(rng, nll_per_token, n=36):
    den = [24, 16, 8] * (n // 3)
    return {"num": [rng.normal(nll_per_token, 0.3) * d for d in den], "den": den, "kind": "ppl"}


def test_switching_claims_sign_and_cis():
    from bts.pipeline.claims import check_claims
    from bts.pipeline.summary import add_cell_cis

    rng = np.random.default_rng(5)
    per_seed = []
    for _ in range(3):
        seeds = {}
        for m, nll in (("bts", 2.0), ("btm", 2.2), ("expert_routing", 1.8)):
            seeds[m] = {f"ppl:{d}": _switch_cell(rng, 2.0) for d in ("general", "code", "math", "multilingual")}
            seeds[m]["switch:all"] = _switch_cell(rng, nll)
            seeds[m]["switch:general>code"] = _switch_cell(rng, nll)
        per_seed.append(seeds)
    by_id = {c["id"]: c for c in check_claims(per_seed, b=300)}
    btm, er = by_id["bts_beats_btm_switching"], by_id["bts_beats_expert_routing_switching"]
    # statistic = other − BTS perplexity on the pooled post-switch tokens: positive when BTS is better
    for c, other in ((btm, "btm"), (er, "expert_routing")):
        want = [cell_value(**s[other]["switch:all"]) - cell_value(**s["bts"]["switch:all"]) for s in per_seed]
        assert c["per_seed"] == pytest.approx(want) and c["diff"] == pytest.approx(np.mean(want))
        assert c["ci"][0] <= c["diff"] <= c["ci"][1] and c["unit"] == "ppl"
    assert btm["diff"] > 0 and btm["verdict"] == "holds"
    assert er["diff"] < 0 and er["verdict"] == "does not hold"
    # a run without domain-switching cells makes no switching claim (and no KeyError)
    for s in per_seed:
        for m in s.values():
            m.pop("switch:all")
    assert not {"bts_beats_btm_switching", "bts_beats_expert_routing_switching"} & {
        c["id"] for c in check_claims(per_seed, b=50)}
    entries = {m: {"ppl": {}, "tasks": {}} for m in per_seed[0]}
    add_cell_cis(entries, per_seed)
    assert set(entries["bts"]["switch_ppl_ci"]) == {"general>code"} and set(entries["bts"]["ppl_ci"]) == {
        "general", "code", "math", "multilingual"} and entries["bts"]["tasks_ci"] == {}


def test_tables_show_switching_perplexity_with_cis(tmp_path):
    from bts.pipeline.report import write_results

    def entry(family, ppl, switch):
        return {"family": family, "params": {"trained": 1, "total": 2, "active": 2},
                "ppl": dict.fromkeys(("general", "code", "math", "multilingual"), ppl),
                "switch_ppl": {"all": switch, "general>code": switch + 1},
                "switch_ppl_ci": {"all": [switch - 0.5, switch + 0.5], "general>code": [switch, switch + 2]},
                "tasks": {}, "avg": None}

    metrics = {"profile": "t", "seeds": [0], "wall_seconds": 1.0, "config": {},
               "methods": {"btm": entry("merging", 10.0, 14.0), "bts": entry("merging", 11.0, 12.5)},
               "ablations": {}}
    write_results(tmp_path, metrics)
    table = (tmp_path / "table.md").read_text()
    assert "## Domain-switching text" in table and "| method | family | all | general>code |" in table
    assert "| bts | Expert merging | **12.50 [12.00, 13.00]** | **13.50 [12.50, 14.50]** |" in table
    readme = (tmp_path / "README.md").read_text()
    assert "| btm | 14.00 [13.50, 14.50] | 10.00 |" in readme
    assert json.loads((tmp_path / "metrics.json").read_text())["methods"]["bts"]["switch_ppl"]["all"] == 12.5


# ------------------------------------------------------------------------------------------------ bad input
def test_default_selection_runs_it():
    assert resolve_selection("ppl,switch,math_mc_acc") == (True, True, ["math_mc_acc"])
    assert EvalConfig().switch_types == DEFAULT_TYPES and EvalConfig().switch_fractions == (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bts.eval.testing import all_texts, synthetic_records, tiny_tokenizer

    root = tmp_path_factory.mktemp("switch_cmd")
    data = synthetic_records(8)
    tok = tiny_tokenizer(all_texts(data), vocab_size=300)
    tiny_llama(0, vocab=len(tok), layers=1).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    jsonl = root / "r.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for recs in data.values() for r in recs))
    return root / "model", jsonl


@pytest.mark.parametrize("setting, msg", [
    ("switch_types=code>code", "two sides must be different domains"),
    ("switch_types=general>klingon", "unknown domain 'klingon'"),
    ("switch_types=general", "not of the form A>B"),
    ("switch_types=code>math,code>math", "lists a type twice"),
    ("switch_fractions=0.5,1.0", "strictly between 0 and 1"),
    ("switch_fractions=half", "bad value for switch_fractions"),
    ("switch_blocks=0", "switch_blocks must be an integer >= 1"),
    ("switch_fractions=0.01", "must leave at least one token on each side"),  # round(0.01 * 32) = 0
])
def test_bad_switch_settings_are_one_error_line(model_dir, tmp_path, capsys, setting, msg):
    from bts.cli.main import main as bts_main

    d, jsonl = model_dir
    out = tmp_path / "m.json"
    capsys.readouterr()
    rc = bts_main(["eval", "--model", str(d), "--data", str(jsonl), "--tasks", "switch", "--seq-len", "32", "--set", setting,
               "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not out.exists()
    with pytest.raises(BTSError, match="switch"):
        EvalConfig(switch_types=())
