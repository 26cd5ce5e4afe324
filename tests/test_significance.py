"""Bootstrap CIs, paired multi-seed claims with verdicts, no-signal tasks and the regime block (docs/design.md §7)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bts.eval.stats import cell_ci, cell_value, multi_seed_cell_ci, paired_ci, verdict
from bts.pipeline.claims import check_claims, claims_markdown, gate_cells
from bts.pipeline.summary import add_cell_cis, no_signal, set_avg


def _ppl_cell(rng, mean_nll, n=128, tokens=127):
    nll = rng.normal(mean_nll, 0.4, n) * tokens
    return {"num": nll.tolist(), "den": [tokens] * n, "kind": "ppl"}


def _mc_cell(rng, p, n=400):
    return {"num": (rng.random(n) < p).astype(float).tolist(), "den": [1.0] * n, "kind": "pct"}


def test_cell_value_and_ci():
    rng = np.random.default_rng(0)
    c = _ppl_cell(rng, 3.0)
    v = cell_value(c["num"], c["den"], "ppl")
    assert v == pytest.approx(math.exp(sum(c["num"]) / sum(c["den"])))
    lo, hi = cell_ci(c["num"], c["den"], "ppl")
    assert lo < v < hi
    mc = _mc_cell(rng, 0.4)
    v = cell_value(mc["num"], mc["den"], "pct")
    lo, hi = cell_ci(mc["num"], mc["den"], "pct")
    assert lo < v < hi and 40 - 8 < v < 40 + 8
    # a binomial proportion's 95 % half-width is ~1.96 * sqrt(p(1-p)/n) = 4.8 points at n=400
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.4 * 0.6 / 400) * 100, rel=0.2)
    small = _mc_cell(rng, 0.4, n=50)
    assert np.diff(cell_ci(small["num"], small["den"], "pct")) > hi - lo  # fewer items, wider CI
    assert cell_ci(mc["num"], mc["den"], "pct") == [lo, hi]  # seeded: deterministic


def test_multi_seed_ci_covers_seed_spread():
    rng = np.random.default_rng(1)
    seeds = [_mc_cell(rng, p) for p in (0.30, 0.40, 0.50)]
    lo, hi = multi_seed_cell_ci(seeds)
    one = cell_ci(seeds[1]["num"], seeds[1]["den"], "pct")
    assert hi - lo > one[1] - one[0]  # seed-to-seed spread widens the interval


def test_verdicts():
    assert verdict([0.1, 0.5], "positive") == "holds"
    assert verdict([-0.5, -0.1], "positive") == "does not hold"
    assert verdict([-0.1, 0.5], "positive") == "unresolved"
    assert verdict([-0.5, -0.1], "negative") == "holds"
    with pytest.raises(ValueError):
        verdict([0, 1], "up")


def test_paired_ci_detects_a_real_difference_and_not_noise():
    rng = np.random.default_rng(2)
    # the same items for both methods: b is a copy of a with every block's NLL lowered by 0.05 nats/token
    per_seed = []
    for _ in range(3):
        a = _ppl_cell(rng, 3.0)
        b = dict(a, num=[x - 0.05 * 127 for x in a["num"]])
        noise = dict(a, num=[x + rng.normal(0, 2) for x in a["num"]])
        per_seed.append({"a": {"ppl:x": a}, "b": {"ppl:x": b}, "c": {"ppl:x": noise}})
    diff, ci, vals = paired_ci(per_seed, lambda v: v["a"]["ppl:x"] - v["b"]["ppl:x"])
    assert len(vals) == 3 and all(x > 0 for x in vals)
    assert verdict(ci, "positive") == "holds" and ci[0] <= diff <= ci[1]
    _, ci_noise, _ = paired_ci(per_seed, lambda v: v["a"]["ppl:x"] - v["c"]["ppl:x"])
    assert verdict(ci_noise, "positive") == "unresolved"
    bad = [{"a": {"ppl:x": per_seed[0]["a"]["ppl:x"]}, "b": {"ppl:x": _ppl_cell(rng, 3.0, n=10)}}]
    with pytest.raises(ValueError, match="different numbers of items"):
        paired_ci(bad, lambda v: v["a"]["ppl:x"] - v["b"]["ppl:x"])


def test_claims_on_synthetic_results():
    rng = np.random.default_rng(3)
    domains = ("general", "code", "math", "multilingual")

    def method(shift, p=0.4):
        cells = {f"ppl:{d}": _ppl_cell(rng, 3.0 + shift) for d in domains}
        cells["general_mc_acc"] = _mc_cell(rng, p)
        return cells

    per_seed = []
    for _ in range(3):
        per_seed.append({"seed": method(0.3), "bts": method(0.0, 0.5), "btm": method(-0.3),
                         "expert_code": method(0.5), "expert_math": method(0.5), "expert_multilingual": method(0.5)})
    gates = {"names": ["seed", "code"], "experts": ["code"],
             "prompt_gates": {"general": [[0.8, 0.2]] * 8, "code": [[0.3, 0.7]] * 8}}
    claims = check_claims(per_seed, ["general_mc_acc"], [gates] * 3, b=300)
    by_id = {c["id"]: c for c in claims}
    assert by_id["bts_beats_seed"]["verdict"] == "holds"
    assert by_id["bts_beats_btm"]["verdict"] == "does not hold"
    assert by_id["bts_avg_beats_seed"]["verdict"] == "holds"
    assert by_id["expert_code_specialises"]["verdict"] == "does not hold"
    assert by_id["gate_code_own_domain"]["diff"] == pytest.approx(0.7 - (0.2 * 8 + 0.7 * 8) / 16)
    assert "k4_beats_k1" not in by_id  # claims whose rows are missing are not made
    for c in claims:
        assert c["verdict"] in ("holds", "does not hold", "unresolved") and len(c["ci"]) == 2 and c["paper"]
    text = claims_markdown(claims, 3)
    assert "**does not hold**" in text and "3 seed(s)" in text
    assert gate_cells(None) == {}


def test_no_signal_and_avg():
    methods = {"seed": {"tasks": {"a": 40.0, "b": 26.0, "z": 0.0}, "tasks_ci": {"a": [35.0, 45.0], "b": [22.0, 30.0],
                                                                            "z": [0.0, 0.0]}},
               "bts": {"tasks": {"a": 42.0, "b": 27.0, "z": 0.0}}}
    chance = {"a": 25.0, "b": 25.0, "z": 0.0}
    assert no_signal(methods, chance) == ["b", "z"]  # b: CI includes chance; z: every method scores 0
    e = dict(methods["bts"])
    set_avg(e, ["a"])
    assert e["avg"] == 42.0


def test_add_cell_cis_sets_ppl_and_task_intervals():
    rng = np.random.default_rng(4)
    items = {"m": {"ppl:code": _ppl_cell(rng, 2.0), "t": _mc_cell(rng, 0.5)}}
    entries = {"m": {"ppl": {}, "tasks": {}}}
    add_cell_cis(entries, [items])
    assert set(entries["m"]["ppl_ci"]) == {"code"} and set(entries["m"]["tasks_ci"]) == {"t"}
    lo, hi = entries["m"]["ppl_ci"]["code"]
    assert lo < cell_value(**{k: items["m"]["ppl:code"][k] for k in ("num", "den", "kind")}) < hi


def test_regime_reports_what_ran_not_what_the_config_file_says(tmp_path):
    """A profile's overrides (e.g. smol: lr 3e-5, nothing frozen over configs/experts/tiny_*.yaml's 1e-3 and frozen
    head) are what the regime block reports: training.json first, the config file only as a fallback."""
    import json

    import yaml

    from bts.pipeline.summary import regime

    runs = tmp_path / "runs"
    (runs / "seed").mkdir(parents=True)
    (runs / "seed" / "import.json").write_text(json.dumps({"n_params": 1000}))
    (runs / "configs").mkdir()
    for i, d in enumerate(("code", "math", "multilingual")):
        cfg = {"model": {"init_args": {"lr": 1e-3, "freeze": ["embeddings", "final_norm", "head"]}}}
        (runs / "configs" / f"expert_{d}.yaml").write_text(yaml.safe_dump(cfg))
        (runs / f"expert_{d}").mkdir()
        freeze = [] if i else ["embeddings", "head"]
        (runs / f"expert_{d}" / "training.json").write_text(json.dumps({"lr": 3e-5, "freeze": freeze,
                                                                        "tokens_seen": 100 * (i + 1)}))
    methods = {"seed": {"ppl": {"code": 10.0}}, "expert_code": {"ppl": {"code": 8.0}}}
    r = regime([runs], methods)
    assert r["expert_lr"] == 3e-5 and r["seed_params"] == 1000 and r["seed_tokens"] is None
    assert r["expert_frozen"] == ["embeddings", "head"]  # the union over experts, as they ran
    assert r["expert_tokens"] == 200 and abs(r["experts"]["code"]["own_ppl_gain"] - 0.2) < 1e-12
    (runs / "expert_code" / "training.json").write_text(json.dumps({"lr": 3e-5}))  # an older run: no "freeze"
    assert regime([runs], methods)["expert_frozen"] == ["embeddings", "final_norm", "head"]
