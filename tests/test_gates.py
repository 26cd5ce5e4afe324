"""Gate analysis (paper §4.3): traces, prompts, summary, figures, TensorBoard and the `bts gates` command.

Hermetic: tiny random Llama StitchedLMs with random non-zero gate weights, synthetic records and a character-level
tokenizer (a real BPE tokenizer only for the command's end-to-end test); the real corpus is never touched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bts.data
from bts.core.io import BTSError
from bts.stitch.checkpoint import save_stitched
from bts.stitch.gates.analysis import analyze
from bts.stitch.gates.figures import switch_figure
from bts.stitch.gates.prompts import GATE_SWITCH_TYPES, domain_prompts, switch_prompts
from bts.stitch.gates.summary import markdown_table, own_domain_flags, summarize
from bts.stitch.gates.trace import gate_trace
from bts.stitch.model import StitchConfig, StitchedLM
from conftest import perturbed_copy, tiny_llama

NAMES = ["code", "math", "multilingual"]
DOMAINS = ["general", "code", "math", "multilingual"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# character-level tokenizer: every domain writes with its own alphabet, so token ids reveal the domain
ALPHABETS = {"general": "abcdefgh ", "code": "ijklmn()=", "math": "0123456789+", "multilingual": "opqrstuvw"}
CHARS = "\n" + "".join(ALPHABETS.values())


class CharTokenizer:
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [3 + CHARS.index(c) for c in text]


def _domain_of(token: int) -> str | None:
    c = CHARS[token - 3]
    return next((d for d, a in ALPHABETS.items() if c in a), None)


def _records(n: int = 12, length: int = 60) -> dict[str, list[dict]]:
    rng = np.random.default_rng(0)
    out = {}
    for d, alpha in ALPHABETS.items():
        # math records are short (like one generated problem), so prompts are filled with several of them
        n_chars = 9 if d == "math" else length
        out[d] = [{"text": "".join(rng.choice(list(alpha), n_chars)), "domain": d} for _ in range(n)]
    return out


def _stitched(hub, experts, k: int = 4, vocab: int = 97) -> StitchedLM:
    model = StitchedLM(hub, experts, StitchConfig(num_stitch_layers=k), hub_name="seed", expert_names=NAMES)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """d=32 matmuls gain nothing from threads, and spinning threads are slow on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def model(llama_family):
    seed, experts = llama_family
    return _stitched(seed, experts)  # K=4: H2E, E2H, H2E, E2H after layers 1, 2, 3, 4


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    seed = tiny_llama(0)
    model = _stitched(seed, [perturbed_copy(seed, s) for s in (1, 2, 3)])
    out = tmp_path_factory.mktemp("gates")
    result = analyze(model, CharTokenizer(), out / "results", n_prompts=3, seed=0, records=_records(),
                     tb_log_dir=out / "tb", max_tokens=40)
    return model, out, result


# ------------------------------------------------------------------------------------------------ trace
def test_trace_shapes_softmax_and_direct_gates(model):
    ids = torch.randint(0, 97, (1, 15), generator=torch.Generator().manual_seed(1))
    model.train()  # gate dropout would be active: the trace must switch it off and restore the mode
    captured = []
    last_e2h = model.stitch_layers[3]
    handle = last_e2h.register_forward_pre_hook(lambda mod, args: captured.append(args[0][0].detach().clone()))
    try:
        tr = gate_trace(model, ids)
        tr2 = gate_trace(model, ids[0].tolist())
    finally:
        handle.remove()
    assert model.training and not model.hub.training
    assert tr["names"] == ["seed", *NAMES] and tr["after_layers"] == [2, 4]
    assert len(tr["layers"]) == 2 and tr["last"] is tr["layers"][-1]
    for g in tr["layers"]:
        assert g.shape == (15, 4)
        np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-5)
        assert (g > 0).all()
    for a, b in zip(tr["layers"], tr2["layers"]):
        np.testing.assert_array_equal(a, b)  # no dropout → deterministic
    assert not np.allclose(tr["last"], 0.25, atol=1e-3)  # random gates: not the uniform identity init
    # independent recomputation of eq. 3's gate from the hub state entering the last E2H layer
    h0 = captured[0]
    d, n1 = model.hidden_size, 4
    logits = last_e2h.stitch_gate(h0).view(1, 15, d, n1)
    direct = torch.softmax(logits, dim=-1).mean(dim=2)[0].detach().numpy()
    np.testing.assert_allclose(tr["last"], direct, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        gate_trace(model, torch.zeros(2, 4, dtype=torch.long))


def test_trace_refuses_model_without_e2h(llama_family):
    seed, experts = llama_family
    model = _stitched(seed, experts, k=4)
    model._placement = [(a, "h2e") for a, _ in model._placement]  # simulate a model without E2H layers
    with pytest.raises(BTSError, match="no Experts-into-Hub"):
        gate_trace(model, [1, 2, 3])


# ------------------------------------------------------------------------------------------------ prompts
def test_domain_prompts_seeded_filled_and_disjoint():
    recs, tok = _records(), CharTokenizer()
    a = domain_prompts(recs, tok, n_prompts=3, seed=0, max_tokens=40)
    b = domain_prompts(recs, tok, n_prompts=3, seed=0, max_tokens=40)
    c = domain_prompts(recs, tok, n_prompts=3, seed=1, max_tokens=40)
    assert a == b and a != c
    for d, ps in a.items():
        assert len(ps) == 3
        assert all(len(p["ids"]) == 40 for p in ps)  # truncated (general) or filled with more records (math)
        used = [i for p in ps for i in p["records"]]
        assert len(used) == len(set(used))
        assert {_domain_of(t) for p in ps for t in p["ids"]} <= {d, None}
    assert all(len(p["records"]) > 1 for p in a["math"])  # 9-char records: filled
    assert all(len(p["records"]) == 1 for p in a["general"])
    # records without text are skipped; indices refer to the given list
    recs["code"] = [{"text": "  "}, *recs["code"]]
    shifted = domain_prompts(recs, tok, n_prompts=3, seed=0, max_tokens=40)["code"]
    used = {i for p in shifted for i in p["records"]}
    assert 0 not in used and all(tok.encode(recs["code"][i]["text"])[:5] for i in used)


def test_switch_prompts_are_the_scored_switch_blocks():
    """A context-switching prompt is a block of the domain-switching evaluation (same function, seed and length),
    switching at the middle: a run of A documents (each + EOS), then B documents from a document start."""
    from bts.data.switching import switch_blocks_of

    recs, tok = _records(), CharTokenizer()
    sw = switch_prompts(recs, tok, n_switch=5, seed=0, max_tokens=40)
    assert [s["type"] for s in sw] == [*GATE_SWITCH_TYPES, GATE_SWITCH_TYPES[0]]
    assert [s["block"] for s in sw] == [1, 1, 1, 1, 4]  # the 1/2 block of each type; then its next 1/2 block
    for s in sw:
        a, b = s["type"].split(">")
        assert s["order"] == [a, b] and s["boundaries"] == [20] and len(s["ids"]) == 40
        assert s["segments"] == [{"domain": a, "start": 0, "end": 20}, {"domain": b, "start": 20, "end": 40}]
        ids = s["ids"]
        assert ids[19] == tok.eos_token_id  # the prefix ends a document
        assert {_domain_of(t) for t in ids[:20] if t != tok.eos_token_id} == {a}
        assert {_domain_of(t) for t in ids[20:] if t != tok.eos_token_id} == {b}
        assert ids[20] != tok.eos_token_id
        block = switch_blocks_of(lambda d: recs[d], tok.encode, tok.eos_token_id, 40, [s["type"]],
                                 n_blocks=s["block"] + 1, seed=0)[s["type"]][s["block"]]
        assert list(block.ids) == ids and block.switch == 20
    assert switch_prompts(recs, tok, n_switch=5, seed=0, max_tokens=40) == sw
    assert switch_prompts(recs, tok, n_switch=5, seed=1, max_tokens=40) != sw
    with pytest.raises(BTSError, match="both domains"):
        switch_prompts({"math": recs["math"]}, tok)


def test_switch_figure_draws_boundaries(model):
    recs, tok = _records(), CharTokenizer()
    s = switch_prompts(recs, tok, n_switch=1, seed=0)[0]
    fig = switch_figure(s, gate_trace(model, s["ids"]))
    ax = fig.axes[0]
    vlines = [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert vlines == [b - 0.5 for b in s["boundaries"]]
    assert [t.get_text() for t in ax.texts] == s["order"]
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]) == 4  # one curve per model


# ------------------------------------------------------------------------------------------------ summary
def _fake_trace(gates: list[list[float]], t: int = 5, layers: int = 1) -> dict:
    g = np.tile(np.asarray(gates, dtype=float), (t, 1)) if np.ndim(gates) == 1 else np.asarray(gates, dtype=float)
    return {"names": ["seed", *NAMES], "after_layers": list(range(1, layers + 1)), "layers": [g] * layers,
            "last": g}


def test_own_domain_flags_on_constructed_example():
    means = {
        "general": {"seed": 0.7, "code": 0.1, "expert_math": 0.1, "law": 0.1},
        "code": {"seed": 0.3, "code": 0.5, "expert_math": 0.1, "law": 0.1},
        "math": {"seed": 0.4, "code": 0.2, "expert_math": 0.2, "law": 0.2},
        "multilingual": {"seed": 0.4, "code": 0.1, "expert_math": 0.1, "law": 0.4},
    }
    overall = {n: float(np.mean([m[n] for m in means.values()])) for n in means["general"]}
    flags = own_domain_flags(means, overall, ["code", "expert_math", "law"])
    assert set(flags) == {"code", "expert_math"}  # 'law' is not named after a domain
    assert flags["code"] == {"domain": "code", "own_domain_mean": 0.5, "overall_mean": pytest.approx(0.225),
                             "margin": pytest.approx(0.275), "exceeds": True}
    assert flags["expert_math"]["domain"] == "math" and flags["expert_math"]["exceeds"] is True  # 0.2 > 0.125
    tie = own_domain_flags({"code": {"code": 0.3}, "math": {"code": 0.3}}, {"code": 0.3}, ["code"])
    assert tie["code"]["exceeds"] is False  # strictly greater

    # through summarize, from per-token traces; math gets less on math prompts than on average
    traces = {
        "general": [_fake_trace([0.7, 0.1, 0.1, 0.1])],
        "code": [_fake_trace([0.3, 0.5, 0.1, 0.1])],
        "math": [_fake_trace([0.4, 0.2, 0.1, 0.3])],  # math gets less on math prompts than elsewhere
        "multilingual": [_fake_trace([0.3, 0.1, 0.2, 0.4])],
    }
    s = summarize(traces)
    assert s["overall"]["mean_gate"]["math"] == pytest.approx(0.125)
    assert s["specialization"]["code"]["exceeds"] is True
    assert s["specialization"]["math"]["exceeds"] is False
    assert s["specialization"]["multilingual"]["exceeds"] is True
    assert s["claim_holds"] is False
    assert "math: no" in s["markdown"] and "code: yes" in s["markdown"]
    assert s["markdown"] == markdown_table(s)
    assert "| code (1) | 0.3000 | **0.5000** | 0.1000 | 0.1000 |" in s["markdown"]


def test_summarize_weights_every_prompt_once():
    # a long and a short prompt: the domain mean is the mean of the prompt means, not of all tokens
    long = _fake_trace(np.tile([0.4, 0.2, 0.2, 0.2], (10, 1)).tolist(), layers=2)
    short = _fake_trace(np.tile([0.1, 0.3, 0.3, 0.3], (2, 1)).tolist(), layers=2)
    s = summarize({"code": [long, short], "math": [short]})
    assert s["domains"]["code"]["mean_gate"]["seed"] == pytest.approx(0.25)
    assert s["domains"]["code"]["n_tokens"] == 12
    assert s["overall"]["mean_gate"]["seed"] == pytest.approx(0.2)
    assert [pl["after_layer"] for pl in s["overall"]["per_layer"]] == [1, 2]
    assert s["specialization"]["code"]["exceeds"] is False and s["specialization"]["math"]["exceeds"] is True
    assert "multilingual" not in s["specialization"]  # no multilingual prompts


def test_analyze_summary_equals_direct_recomputation(analyzed):
    model, _, result = analyzed
    prompts = domain_prompts(_records(), CharTokenizer(), n_prompts=3, seed=0, max_tokens=40)
    assert result["settings"]["prompt_records"] == {d: [p["records"] for p in ps] for d, ps in prompts.items()}
    names = ["seed", *NAMES]
    per_prompt = {}
    for d, ps in prompts.items():
        per_prompt[d] = []
        for p in ps:
            with torch.no_grad(), model.record_gates() as rec:
                model(torch.tensor([p["ids"]]))
            per_prompt[d].append([g[0].mean(dim=0).double().numpy() for g in rec.gates])  # per layer [n+1]
    all_prompts = [pp for d in per_prompt for pp in per_prompt[d]]
    assert result["e2h_layers"] == [2, 4] and result["last_e2h_layer"] == 4
    for li in range(2):
        overall = np.mean([pp[li] for pp in all_prompts], axis=0)
        got = result["overall"]["per_layer"][li]["mean_gate"]
        np.testing.assert_allclose([got[n] for n in names], overall, atol=1e-6)
        for d in DOMAINS:
            want = np.mean([pp[li] for pp in per_prompt[d]], axis=0)
            got = result["domains"][d]["per_layer"][li]["mean_gate"]
            np.testing.assert_allclose([got[n] for n in names], want, atol=1e-6)
            assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
            if li == 1:
                assert result["domains"][d]["mean_gate"] == got
    for e in NAMES:
        spec = result["specialization"][e]
        own = result["domains"][e]["mean_gate"][e]
        assert spec["exceeds"] == (own > result["overall"]["mean_gate"][e])
    assert result["claim_holds"] == all(s["exceeds"] for s in result["specialization"].values())
    for s in result["switch"]:
        assert [seg["domain"] for seg in s["segments"]] == s["order"]
        for seg in s["segments"]:
            assert sum(seg["mean_gate"].values()) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------ outputs
def test_analyze_writes_valid_pngs_json_and_tensorboard(analyzed):
    import matplotlib.image as mpimg

    _, out, result = analyzed
    res = out / "results"
    expected = {f"gates_{d}.png" for d in DOMAINS} | {f"gates_switch_{i}.png" for i in range(4)} | {
        "gates_summary.png"}
    assert {p.name for p in (res / "figures").iterdir()} == expected  # no temporary files left
    for name in expected:
        data = (res / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        img = mpimg.imread(res / "figures" / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    on_disk = json.loads((res / "gates.json").read_text())
    assert on_disk["format"] == "bts-gates" and on_disk["names"] == ["seed", *NAMES]
    assert on_disk["figures"]["math"] == "figures/gates_math.png"
    assert on_disk["domains"] == json.loads(json.dumps(result["domains"]))
    assert on_disk["markdown"].startswith("Mean E2H gate") and "| all (12) |" in on_disk["markdown"]
    assert sorted(p.name for p in res.iterdir()) == ["figures", "gates.json"]
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000


def test_analyze_input_errors_write_nothing(model, tmp_path):
    class BigTokenizer(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [500 + i for i in super().encode(text)]

    out = tmp_path / "out"
    with pytest.raises(BTSError, match="vocab_size"):
        analyze(model, BigTokenizer(), out, n_prompts=1, records=_records())
    with pytest.raises(BTSError, match="no records"):
        analyze(model, CharTokenizer(), out, n_prompts=1, records={"math": []}, n_switch=0)
    with pytest.raises(BTSError, match="no records given"):
        analyze(model, CharTokenizer(), out, n_prompts=1, records=_records(), domains=["law"])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ command
def test_command_errors_cleanly_on_missing_checkpoint(tmp_path, capsys):
    from bts.cli.main import main as bts_main

    out = tmp_path / "out"
    for ckpt in (tmp_path / "missing", tmp_path):  # no directory; a directory without bts.json
        rc = bts_main(["gates", "--ckpt", str(ckpt), "--tokenizer", str(tmp_path), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()
    assert bts_main(["gates", "--ckpt", "x"]) == 2 and "out" in capsys.readouterr().err
    assert bts_main(["gates", "--help", "--ckpt", "x"]) == 0 and capsys.readouterr().err == ""  # help wins
    # an output that cannot be written is refused before the checkpoint is looked at
    assert bts_main(["gates", "--ckpt", str(tmp_path / "missing"), "--out", "/proc/gates"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_command_end_to_end_on_saved_checkpoint(tmp_path, monkeypatch, capsys):
    from bts.cli.main import main as bts_main
    from bts.data.tokenizer import build_tokenizer

    texts = [r["text"] for rs in _records(40).values() for r in rs] + ["Hello world, this is text."] * 20
    tok = build_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(str(tmp_path / "tok"))
    seed = tiny_llama(0, vocab=len(tok))
    dirs = []
    for i, m in enumerate([seed, *[perturbed_copy(seed, s) for s in (1, 2, 3)]]):
        dirs.append(tmp_path / f"m{i}")
        m.save_pretrained(dirs[-1])
    model = StitchedLM.from_pretrained_dirs(dirs[0], dirs[1:], hub_name="seed", expert_names=NAMES,
                                            num_stitch_layers=2)
    with torch.no_grad():
        for p in model.stitch_layers.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_stitched(model, tmp_path / "bts")

    recs = _records()
    calls = []

    def fake_load_split(domain, split, cache_dir=None, **kw):
        calls.append((domain, split, cache_dir))
        return recs[domain]

    monkeypatch.setattr(bts.data, "load_split", fake_load_split, raising=False)
    out = tmp_path / "results"
    rc = bts_main(["gates", "--ckpt", str(tmp_path / "bts"), "--tokenizer", str(tmp_path / "tok"), "--out",
                   str(out), "--n-prompts", "2", "--max-tokens", "24", "--n-switch", "1", "--cache-dir", "C",
                   "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(calls) == sorted((d, "test", "C") for d in DOMAINS)
    assert "| prompts | seed (hub) |" in captured.out
    result = json.loads((out / "gates.json").read_text())
    assert result["checkpoint"] == str(tmp_path / "bts") and result["e2h_layers"] == [4]
    assert result["settings"]["records"].startswith("test split")
    assert (out / "figures" / "gates_switch_0.png").read_bytes()[:8] == PNG_MAGIC
