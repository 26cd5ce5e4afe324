"""Profile-level sweeps (``bts sweep`` with a ``stages`` key): each grid point reruns a chain of the profile's stages
(e.g. the experts, the ceiling, BTM and BTS) in its own run directory with some stage arguments changed.

Grid keys are ``<ModelClass>:<dotted.key>``: the value is passed as ``--<dotted.key>=<value>`` to every fit stage
of that LightningModule class (``CausalLMModule:model.init_args.lr`` changes the experts' lr; the pinned seed is
not trained, so it is unaffected). Each point runs in ``<runs_dir>/sweeps/<name>/<point>/`` (fresh log dirs) and
is evaluated with ``eval_tasks`` (default: perplexity only). The table (``results/<profile>/sweeps/<name>.md``)
puts side by side what the regime needs (docs/design.md §7): each expert's own-domain gain over the seed, its
head-drift ceiling (``bts ceiling``), BTS ÷ expert on that domain, and BTS − BTM in mean perplexity.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from bts.core.io import BTSError, atomic_write_json, atomic_write_text, ensure_writable_dir, exclusive_lock
from bts.data.domains import DOMAINS, EXPERT_DOMAINS
from bts.data.switching import ALL
from bts.pipeline.run import Pipeline
from bts.pipeline.sweep_config import point_name
from bts.stitch.ceiling import ceiling_of


def _parse_key(key: str) -> tuple[str, str]:
    cls, sep, dotted = key.partition(":")
    if not sep or not cls or not dotted:
        raise BTSError(f"sweep grid key {key!r}: expected '<ModelClass>:<dotted.key>' in a profile sweep")
    return cls, dotted


def _arg_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def regime_row(methods: dict, ceiling: dict | None) -> dict:
    """The regime numbers of one point from its evaluated methods and ``ceiling.json``."""
    row: dict = {}
    seed, bts, btm = methods.get("seed"), methods.get("bts"), methods.get("btm")
    for d in EXPERT_DOMAINS:
        e = methods.get(f"expert_{d}")
        if e and seed:
            row[f"gain_{d}"] = 1.0 - e["ppl"][d] / seed["ppl"][d]
        if ceiling and d in ceiling:
            row[f"ceiling_{d}"] = ceiling_of(ceiling[d])
        if e and bts:
            row[f"bts_over_expert_{d}"] = bts["ppl"][d] / e["ppl"][d]
    if bts and btm:
        row["bts_minus_btm"] = (sum(bts["ppl"][d] for d in DOMAINS) - sum(btm["ppl"][d] for d in DOMAINS)) / len(DOMAINS)
    if bts and seed:
        row["bts_minus_seed"] = (sum(bts["ppl"][d] for d in DOMAINS) - sum(seed["ppl"][d] for d in DOMAINS)) / len(DOMAINS)
    return row


def regime_table(name: str, points: dict) -> str:
    cols = ([f"gain_{d}" for d in EXPERT_DOMAINS] + [f"ceiling_{d}" for d in EXPERT_DOMAINS]
            + [f"bts_over_expert_{d}" for d in EXPERT_DOMAINS] + ["bts_minus_btm", "bts_minus_seed"])
    labels = {"gain": "gain", "ceiling": "ceiling", "bts_over_expert": "BTS ÷ expert"}
    head = ["point"]
    for c in cols:
        prefix, _, dom = c.rpartition("_") if c.startswith(("gain", "ceiling", "bts_over")) else (c, "", "")
        head.append(f"{labels.get(prefix, prefix)} {dom}".strip() if dom else
                    {"bts_minus_btm": "BTS − BTM (mean ppl)", "bts_minus_seed": "BTS − seed (mean ppl)"}[c])
    lines = [f"## Sweep `{name}`", "",
             ("gain = 1 − expert ppl ÷ seed ppl on the expert's own domain (target ≥ 0.20); ceiling = ppl of the "
              "hub's norm and head on the best linear map of the expert's final states ÷ the expert's ppl (target "
              "≤ 1.05; `bts ceiling`); BTS ÷ expert on that domain; BTS − BTM and BTS − seed in mean held-out "
              "perplexity over the four domains (negative: BTS is better). One seed per point."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point, row in points.items():
        cells = [f"`{point}`"] + [("–" if row.get(c) is None else f"{row[c]:.3f}") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stitch_budget_row(methods: dict, bts: dict, training: dict | None, seconds: float | None) -> dict:
    """One point of a sweep over the BTS stage (``reference`` stages in the sweep config): BTS ÷ expert per domain,
    BTS − BTM and BTS − seed in mean held-out perplexity (``regime_row``), BTS − BTM in post-switch perplexity on
    domain-switching text (all switch types pooled), the stitch tokens per stitch parameter the point trained on
    (its ``training.json``) and the BTS stage's wall seconds."""
    row = {k: v for k, v in regime_row({**methods, "bts": bts}, None).items() if not k.startswith("gain_")}
    switch, switch_btm = (bts.get("switch_ppl") or {}).get(ALL), ((methods.get("btm") or {}).get("switch_ppl") or {}).get(ALL)
    if switch is not None and switch_btm is not None:
        row["switch_bts_minus_btm"] = switch - switch_btm
    tokens = (training or {}).get("tokens_seen")
    params = ((training or {}).get("params") or {}).get("trained")
    row.update(stitch_tokens=tokens, stitch_params=params,
               stitch_tokens_per_param=(tokens / params) if tokens and params else None, bts_seconds=seconds)
    return row


STITCH_BUDGET_COLUMNS = {
    "stitch_tokens_per_param": "stitch tokens ÷ stitch param",
    **{f"bts_over_expert_{d}": f"BTS ÷ expert {d}" for d in EXPERT_DOMAINS},
    "bts_minus_btm": "BTS − BTM (mean ppl)",
    "bts_minus_seed": "BTS − seed (mean ppl)",
    "switch_bts_minus_btm": "BTS − BTM (post-switch ppl)",
    "bts_seconds": "BTS stage (s)",
}


def stitch_budget_table(name: str, points: dict) -> str:
    cols = list(STITCH_BUDGET_COLUMNS)
    lines = [f"## Sweep `{name}`", "",
             ("The BTS stage only, over the profile's seed, experts and BTM (trained once). stitch tokens ÷ stitch "
              "param = training tokens ÷ trained stitch parameters (paper: ~57); BTS ÷ expert = BTS ppl ÷ the "
              "expert's on its own domain; BTS − BTM and BTS − seed in mean held-out perplexity over the four "
              "domains; post-switch = perplexity of the tokens after the switch on domain-switching blocks, all "
              "switch types pooled (`bts.eval.tasks.switching`); negative: BTS is better. BTS stage = wall seconds "
              "of the stitch training (model loading and validation included). One seed per point."), "",
             "| point | " + " | ".join(STITCH_BUDGET_COLUMNS.values()) + " |", "|" + "---|" * (len(cols) + 1)]
    for point, row in points.items():
        cells = [f"`{point}`"] + ["–" if row.get(c) is None else
                                  (f"{row[c]:.0f}" if c == "bts_seconds" else f"{row[c]:.3f}") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_profile_sweep(sweep: dict, profile, jobs: int, progress: bool = True) -> int:
    by_name = {s.name: s for s in profile.stages}
    missing = [s for s in sweep["stages"] if s not in by_name]
    if missing:
        raise BTSError(f"sweep {sweep['name']}: profile {profile.profile} has no stage '{missing[0]}'")
    keys = list(sweep["grid"])
    parsed = [_parse_key(k) for k in keys]
    root = ensure_writable_dir(Path(profile.runs_dir) / "sweeps" / sweep["name"])
    results_dir = ensure_writable_dir(Path(profile.results_dir) / "sweeps")
    points: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    for values in itertools.product(*(sweep["grid"][k] for k in keys)):
        assignment = {dotted: v for (_, dotted), v in zip(parsed, values)}
        name = point_name(assignment)
        p = copy.deepcopy(profile)
        p.runs_dir = str(root / name)
        p.stages = [copy.deepcopy(by_name[s]) for s in sweep["stages"]]
        for s in p.stages:
            s.after = [a for a in s.after if a in sweep["stages"]]
        p.eval_tasks = list(sweep.get("eval_tasks") or ["ppl"])
        p.model_overrides = {k: list(v) for k, v in profile.model_overrides.items()}
        for (cls, dotted), v in zip(parsed, values):
            p.model_overrides.setdefault(cls, []).append(f"--{dotted}={_arg_value(v)}")
        print(f"[sweep {sweep['name']}] point {name}", flush=True)
        ensure_writable_dir(p.runs_dir)
        with exclusive_lock(Path(p.runs_dir) / ".lock", f"run directory {p.runs_dir}"):
            out = Pipeline(p, 0, progress=progress).run(jobs)
        ceiling_file = Path(p.runs_dir) / "ceiling" / "ceiling.json"
        ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
        points[name] = regime_row(out["methods"], ceiling)
        methods = {m: {k: v for k, v in e.items() if k != "items"} for m, e in out["methods"].items()}
        raw[name] = {"assignment": assignment, "methods": methods, "ceiling": ceiling}
        # written after every point: an interrupted sweep keeps the points it finished
        atomic_write_json(results_dir / f"{sweep['name']}.json", {"sweep": sweep, "points": points, "runs": raw})
        atomic_write_text(results_dir / f"{sweep['name']}.md", regime_table(sweep["name"], points))
    print(f"wrote {results_dir}/{sweep['name']}.md ({len(points)} points)")
    return 0


def rewrite_table(sweep: dict, profile) -> int:
    """Recompute the rows and the table of a finished profile sweep from its JSON (``runs``: methods and ceilings)."""
    path = Path(profile.results_dir) / "sweeps" / f"{sweep['name']}.json"
    if not path.is_file():
        raise BTSError(f"{path} does not exist: run the sweep first")
    saved = json.loads(path.read_text())
    points = {name: regime_row(r["methods"], r.get("ceiling")) for name, r in saved.get("runs", {}).items()}
    saved["points"] = points
    atomic_write_json(path, saved)
    atomic_write_text(path.with_suffix(".md"), regime_table(sweep["name"], points))
    print(f"wrote {path.with_suffix('.md')} ({len(points)} points)")
    return 0
