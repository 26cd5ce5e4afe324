"""Which of the paper's claims hold in this regime, with significance (docs/design.md §7).

Each claim is a statistic of a few methods' evaluation cells whose sign is the claim (e.g. ``seed mean ppl − BTS
mean ppl > 0``: "BTS beats the seed"). Its 95 % CI comes from ``bts.eval.stats.paired_ci``: per bootstrap replicate
each cell's items (blocks, MC items, gate prompts) are resampled once for every method and seed (all seeds are
scored on the same items) and the seeds are resampled (paired per seed: the same seed's data, seed model and
experts). The verdict is "holds" when the
CI excludes 0 in the claimed direction, "does not hold" when it excludes 0 the other way, "unresolved" otherwise.
The paper's own figure is printed beside it. Nothing is hand-entered: ``bts reproduce`` recomputes every claim.

The domain-switching claims (``bts_beats_btm_switching``, ``bts_beats_expert_routing_switching``) test the paper's
Table 3 ordering (BTS above BTM and expert routing) where per-token gates (§4.3) and per-sequence routing can
differ: on blocks whose domain changes mid-block (``bts.eval.tasks.switching``), the statistic is the other
method's perplexity minus BTS's on the pooled tokens after the switch (cell ``switch:all``, paired block by block
and seed by seed); positive means BTS is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bts.data.domains import DOMAINS, EXPERT_DOMAINS
from bts.eval.stats import paired_ci, verdict

GATES = "_gates"  # pseudo-method holding the per-prompt gate cells
SWITCH_ALL = "switch:all"
"""The pooled cell of the domain-switching blocks (``bts.eval.tasks.switching``): every block of every switch type,
the tokens after the switch."""


@dataclass
class ClaimSpec:
    id: str
    claim: str
    source: str
    paper: str
    methods: tuple[str, ...]
    stat: Callable[[dict], float]
    direction: str = "positive"
    unit: str = "ppl"
    cells: tuple[str, ...] = ()
    """Evaluation cells every method of the claim must have in every seed (beyond the per-domain perplexity,
    which every evaluation has); a run without them (e.g. ``eval_tasks`` without "switch") skips the claim."""


def _mean_ppl(v: dict, m: str, domains=DOMAINS) -> float:
    return sum(v[m][f"ppl:{d}"] for d in domains) / len(domains)


def _avg(v: dict, m: str, tasks: Sequence[str]) -> float:
    return sum(v[m][t] for t in tasks) / len(tasks)


def claim_specs(names: set[str], signal_tasks: Sequence[str], gate_experts: Sequence[str]) -> list[ClaimSpec]:
    """The claims whose methods are all in ``names`` (methods and ablations of the run)."""
    specs: list[ClaimSpec] = []
    for d in EXPERT_DOMAINS:
        e = f"expert_{d}"
        specs.append(ClaimSpec(
            f"expert_{d}_specialises", f"`{e}` beats the seed on {d} (seed ppl − expert ppl > 0)", "premise (§2)",
            "experts gain on their domain (e.g. GSM8K 10.5 → 20.5, MBPP 27.0 → 32.0)", ("seed", e),
            lambda v, e=e, d=d: v["seed"][f"ppl:{d}"] - v[e][f"ppl:{d}"]))
    specs.append(ClaimSpec("bts_beats_seed", "BTS beats the seed on mean held-out perplexity (seed − BTS > 0)",
                           "Table 3", "Avg 28.1 vs 24.0", ("seed", "bts"),
                           lambda v: _mean_ppl(v, "seed") - _mean_ppl(v, "bts")))
    for d in EXPERT_DOMAINS:
        e = f"expert_{d}"
        specs.append(ClaimSpec(
            f"bts_within_10pct_{d}", f"BTS is within 10 % of `{e}` on {d} (1.10 × expert ppl − BTS ppl > 0)",
            "§3 (experts' capability kept)", {"code": "MBPP 32.2 vs 32.0", "math": "GSM8K 20.2 vs 20.5",
                                             "multilingual": "Flores S 30.9 vs 31.9"}[d],
            ("bts", e), lambda v, e=e, d=d: 1.10 * v[e][f"ppl:{d}"] - v["bts"][f"ppl:{d}"]))
    for other, paper in [("btm", "Avg 28.1 vs 26.9"), ("bam", "Avg 28.1 vs 27.8"), ("btx_soft", "Avg 28.1 vs 27.4"),
                         ("bam_adapters", "Avg 28.1 vs 27.3"), ("soup", "Avg 28.1 vs 25.7"),
                         ("btx_sample", "Avg 28.1 vs 25.7"), ("expert_routing", "Avg 28.1 vs 24.8")]:
        specs.append(ClaimSpec(f"bts_beats_{other}", f"BTS beats `{other}` on mean held-out perplexity",
                               "Table 3", paper, ("bts", other),
                               lambda v, o=other: _mean_ppl(v, o) - _mean_ppl(v, "bts")))
    for other, paper in [("btm", "Avg 28.1 vs 26.9 (downstream; switching text is not evaluated there)"),
                         ("expert_routing", "Avg 28.1 vs 24.8 (downstream; switching text is not evaluated there)")]:
        specs.append(ClaimSpec(
            f"bts_beats_{other}_switching",
            f"BTS beats `{other}` on domain-switching text ({other} − BTS perplexity on the pooled tokens after the "
            "switch > 0)", "Table 3 rows; §4.3 (per-token gates)", paper, ("bts", other),
            lambda v, o=other: v[o][SWITCH_ALL] - v["bts"][SWITCH_ALL], cells=(SWITCH_ALL,)))
    if signal_tasks:
        t = tuple(signal_tasks)
        for other, paper in [("seed", "Avg 28.1 vs 24.0"), ("btm", "Avg 28.1 vs 26.9"), ("bam", "Avg 28.1 vs 27.8")]:
            specs.append(ClaimSpec(f"bts_avg_beats_{other}",
                                   f"BTS beats `{other}` on the downstream average (tasks with signal)",
                                   "Table 3 (Avg)", paper, ("bts", other),
                                   lambda v, o=other: _avg(v, "bts", t) - _avg(v, o, t), unit="points"))
    specs += [
        ClaimSpec("k4_beats_k1", "more stitch layers help: K=4 beats K=1 on mean perplexity", "Table 5",
                  "K=4 28.1 vs K=1 27.0", ("bts", "bts_k1"), lambda v: _mean_ppl(v, "bts_k1") - _mean_ppl(v, "bts")),
        ClaimSpec("all_e2h_vs_alternating", "all-E2H stitch layers are at least as good as alternating ones "
                  "(alternating − all-E2H mean ppl > 0)", "Table 7", "all-E2H 28.4 vs alternating 28.1",
                  ("bts", "bts_all_e2h"), lambda v: _mean_ppl(v, "bts") - _mean_ppl(v, "bts_all_e2h")),
        ClaimSpec("seed_hub_beats_math_hub", "the seed is the better hub: seed-hub BTS beats math-hub BTS",
                  "Table 8", "seed hub 28.1 vs math hub 26.2", ("bts", "bts_hub_math"),
                  lambda v: _mean_ppl(v, "bts_hub_math") - _mean_ppl(v, "bts")),
        ClaimSpec("cross_capability_bam_beats_two_model",
                  "cross-capability: BAM beats the two-model stitch (math + multilingual experts, no seed) on the "
                  "math and multilingual domains (two-model − BAM mean ppl > 0)", "Table 4 (§4.1)",
                  "Ru-MGSM BAM 18.4 vs BTS 16.0", ("bts_two_model", "bam"),
                  lambda v: (_mean_ppl(v, "bts_two_model", ("math", "multilingual"))
                             - _mean_ppl(v, "bam", ("math", "multilingual")))),
    ]
    for d in EXPERT_DOMAINS:
        r = f"bts_remove_{d}"
        others = [x for x in DOMAINS if x != d]
        specs.append(ClaimSpec(
            f"remove_{d}_hurts_{d}_most", f"removing the {d} expert hurts {d} the most (ppl ratio after/before on "
            f"{d} − the largest other domain's ratio > 0)", "§4.2 modularity", "qualitative", ("bts", r),
            lambda v, r=r, d=d, others=others: (v[r][f"ppl:{d}"] / v["bts"][f"ppl:{d}"]
                                                - np.maximum.reduce([v[r][f"ppl:{o}"] / v["bts"][f"ppl:{o}"]
                                                                     for o in others])),
            unit="ratio"))
        specs.append(ClaimSpec(
            f"add_{d}_helps_{d}", f"adding the {d} expert (training only its new slices) beats the model without it "
            f"on {d}", "§4.2 modularity", "qualitative", (r, f"bts_add_{d}"),
            lambda v, r=r, d=d: v[r][f"ppl:{d}"] - v[f"bts_add_{d}"][f"ppl:{d}"]))
    for e in gate_experts:
        specs.append(ClaimSpec(
            f"gate_{e}_own_domain", f"the {e} expert's last-E2H gate is higher on {e} prompts than on all prompts",
            "§4.3 gate analysis", "Figure 3 (qualitative)", (GATES,),
            lambda v, e=e: v[GATES][f"own:{e}"] - v[GATES][f"all:{e}"], unit="gate"))
    return [s for s in specs if all(m in names for m in s.methods)]


def gate_cells(gates: Mapping | None) -> dict:
    """Per-prompt gate cells of one seed's ``gates.json`` (``prompt_gates``): ``own:<expert>`` over the expert's
    domain prompts, ``all:<expert>`` over every domain prompt."""
    if not gates or "prompt_gates" not in gates:
        return {}
    names = list(gates["names"])
    cells = {}
    all_rows = [row for d in gates["prompt_gates"] for row in gates["prompt_gates"][d]]
    for e in gates.get("experts", []):
        j = names.index(e)
        if e in gates["prompt_gates"]:
            own = [row[j] for row in gates["prompt_gates"][e]]
            cells[f"own:{e}"] = {"num": own, "den": [1.0] * len(own), "kind": "mean"}
            cells[f"all:{e}"] = {"num": [row[j] for row in all_rows], "den": [1.0] * len(all_rows), "kind": "mean"}
    return cells


def check_claims(per_seed_items: Sequence[Mapping[str, Mapping]], signal_tasks: Sequence[str] = (),
                 per_seed_gates: Sequence[Mapping | None] = (), b: int = 1000) -> list[dict]:
    """``[{"id", "claim", "source", "verdict", "diff", "ci", "per_seed", "paper", "unit"}]``.

    ``per_seed_items``: per seed, ``{method: items}`` with the evaluation's per-item cells (``evaluate()["items"]``);
    ``per_seed_gates``: per seed, its ``gates.json`` (or None)."""
    per_seed = [dict(items) for items in per_seed_items]
    for s, gates in enumerate(per_seed_gates):
        cells = gate_cells(gates)
        if cells and s < len(per_seed):
            per_seed[s][GATES] = cells
    names = set.intersection(*(set(p) for p in per_seed)) if per_seed else set()
    gate_experts = sorted({c.split(":", 1)[1] for c in per_seed[0].get(GATES, {})}) if GATES in names else []
    out = []
    for spec in claim_specs(names, signal_tasks, gate_experts):
        if not all(c in p[m] for p in per_seed for m in spec.methods for c in spec.cells):
            continue
        sub = [{m: p[m] for m in spec.methods} for p in per_seed]
        diff, ci, vals = paired_ci(sub, spec.stat, b=b)
        out.append({"id": spec.id, "claim": spec.claim, "source": spec.source, "verdict": verdict(ci, spec.direction),
                    "diff": diff, "ci": ci, "per_seed": vals, "paper": spec.paper, "unit": spec.unit})
    return out


def claims_markdown(claims: Sequence[Mapping], n_seeds: int) -> str:
    counts = {v: sum(c["verdict"] == v for c in claims) for v in ("holds", "does not hold", "unresolved")}
    lines = [
        (f"{counts['holds']} hold, {counts['does not hold']} do not hold, {counts['unresolved']} unresolved "
         f"(of {len(claims)}; {n_seeds} seed(s), paired bootstrap over seeds and items, 95 % CI)."), "",
        "| source | claim | verdict | difference [95 % CI] | per seed | paper |", "|---|---|---|---|---|---|"]
    for c in claims:
        v = c["verdict"] if c["verdict"] != "does not hold" else "**does not hold**"
        per = ", ".join(f"{x:+.3g}" for x in c["per_seed"])
        lines.append(f"| {c['source']} | {c['claim']} | {v} | {c['diff']:+.3g} [{c['ci'][0]:+.3g}, "
                     f"{c['ci'][1]:+.3g}] {c['unit']} | {per} | {c['paper']} |")
    return "\n".join(lines) + "\n"
