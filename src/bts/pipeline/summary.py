"""The derived fields of ``metrics.json`` (docs/design.md §6-7), computed from the per-seed evaluation results.

- per method/ablation ``ppl_ci`` / ``switch_ppl_ci`` / ``tasks_ci``: 95 % bootstrap CI of every cell (over items;
  with several seeds over seeds and items, ``bts.eval.stats.multi_seed_cell_ci``);
- ``chance`` per task and ``no_signal_tasks``: a task whose seed CI lower bound is not above chance, or where every
  method scores 0, carries no signal; it stays in ``tasks`` but is left out of ``avg``;
- ``claims``: ``bts.pipeline.claims.check_claims`` (paired over seeds);
- ``regime``: the premises of the paper's regime, measured (seed tokens per parameter, expert lr and tokens
  relative to the seed's, each expert's own-domain gain and head-drift ceiling), with the paper's values.

``build_metrics`` assembles the whole ``metrics.json`` from every seed's ``Pipeline.run()``: floats are the mean over
seeds with a sibling ``<key>_std`` (``aggregate_seeds``), then the fields above, the model sizes, ``env`` and timings.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from bts.data.domains import DOMAINS, EXPERT_DOMAINS
from bts.eval.stats import multi_seed_cell_ci
from bts.pipeline.claims import check_claims
from bts.pipeline.env import collect_env, git_commit
from bts.stitch.ceiling import ceiling_of

PAPER_STITCH_TOKENS = 15e9
PAPER_STITCH_PARAMS = 7 * 3072**2 * 4
"""The paper's stitch stage: 15B tokens over (2n+1)·d²·K stitch parameters of its 2.7B configuration (d 3072, n 3,
K 4; configs/bts/scale/paper_2p7b.yaml). The paper gives the tokens, not the count: the count is our assumption from
its architecture, ~264 M, so ~57 tokens per stitch parameter."""

PAPER_REGIME = {
    "seed_tokens_per_param": "far past 20 (2.7B parameters, trained to convergence)",
    "expert_lr_over_seed_peak": "5e-6 = the seed's final lr (a few % of a typical peak)",
    "expert_tokens_over_seed_tokens": "200B per expert, a fraction of the seed's tokens",
    "own_ppl_gain": "experts gain on their domain (GSM8K 10.5 → 20.5, MBPP 27.0 → 32.0)",
    "ceiling": "≈ 1 (the hub's head reads the experts: lr 5e-6 barely moves heads)",
    "stitch_tokens_per_param": PAPER_STITCH_TOKENS / PAPER_STITCH_PARAMS,
}


def build_metrics(profile: str, outs: Sequence[Mapping], runs_dirs: Sequence[Path], gates: Sequence[dict | None], *,
                  jobs: int, started: float, allow_changed_models: bool = False) -> dict:
    """``metrics.json`` of a reproduction from every seed's ``Pipeline.run()`` output, run directory and gate
    analysis (seed 0 first); ``started``: ``time.perf_counter()`` when the reproduction started."""
    per_seed, per_seed_items, timings = [], [], {}
    for s, out in enumerate(outs):
        entries, items = {}, {}
        for kind in ("methods", "ablations"):
            entries[kind] = {}
            for name, entry in out[kind].items():
                entries[kind][name], items[name] = split_items(entry)
        per_seed.append(entries)
        per_seed_items.append(items)
        timings[f"seed{s}"] = {k: round(v, 1) for k, v in out["timings"].items()}
    chance = {}
    for entries in per_seed:
        for e in entries["methods"].values():
            chance.update(e.pop("chance", {}) or {})
        for e in entries["ablations"].values():
            e.pop("chance", None)
    merged = aggregate_seeds(per_seed)
    for kind in ("methods", "ablations"):
        add_cell_cis(merged[kind], per_seed_items)
    no_signal_tasks = no_signal(merged["methods"], chance)
    tasks = sorted({t for e in merged["methods"].values() for t in e.get("tasks", {}) if not t.endswith("_std")})
    # the average (and the claims on it) covers the tasks with signal that every method was scored on
    signal = [t for t in tasks if t not in no_signal_tasks
              and all(t in e.get("tasks", {}) for e in merged["methods"].values())]
    for entries in per_seed:  # avg over the tasks with signal, per seed, then mean ± std like every other float
        for kind in ("methods", "ablations"):
            for e in entries[kind].values():
                set_avg(e, signal)
    avg = aggregate_seeds(per_seed)
    for kind in ("methods", "ablations"):
        for name, e in merged[kind].items():
            e["avg"] = avg[kind][name].get("avg")
            if "avg_std" in avg[kind][name]:
                e["avg_std"] = avg[kind][name]["avg_std"]
    config = {**model_config_summary(Path(runs_dirs[0])), "domains": list(DOMAINS)}
    metrics = {
        "profile": profile,
        "seeds": list(range(len(outs))),
        "git_commit": git_commit(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "jobs": jobs,
        "config": config,
        "regime": regime(runs_dirs, merged["methods"]),
        "chance": {t: chance[t] for t in tasks if t in chance},
        "no_signal_tasks": no_signal_tasks,
        "methods": merged["methods"],
        "ablations": merged["ablations"],
        "claims": check_claims(per_seed_items, signal, gates),
        "env": _env(Path(runs_dirs[0]), merged),
        "stage_seconds": timings,
    }
    if allow_changed_models:
        metrics["allow_changed_models"] = True
    return metrics


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """Mean over seeds of every float; a sibling '<key>_std' holds the standard deviation (docs/design.md §6)."""
    if len(per_seed) == 1:
        return per_seed[0]

    def agg(values):
        first = values[0]
        if isinstance(first, dict):
            out = {}
            for k in first:
                vals = [v[k] for v in values if k in v]
                out[k] = agg(vals)
                if isinstance(first[k], float):
                    mean = sum(vals) / len(vals)
                    out[f"{k}_std"] = math.sqrt(sum((x - mean) ** 2 for x in vals) / max(1, len(vals) - 1))
            return out
        if isinstance(first, float):
            return sum(values) / len(values)
        return first

    return agg(per_seed)


def model_config_summary(runs: Path) -> dict:
    """Sizes of the seed (and of the BTS model, when there is one) of a run directory: ``metrics.json["config"]``."""
    cfg = json.loads((runs / "seed" / "config.json").read_text())
    summary = {"d_model": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"]}
    bts_manifest = runs / "bts" / "bts.json"
    if bts_manifest.is_file():
        m = json.loads(bts_manifest.read_text())
        summary |= {"n_experts": m["n_experts"], "stitch_layers": m["stitch_config"]["num_stitch_layers"],
                    "stitch_init": m["stitch_config"]["init"]}
    return summary


def _env(runs: Path, merged: dict) -> dict:
    """The ``env`` block: package versions, machine, matmul peak, hashes of data, tokenizer and models."""
    names = [*merged["methods"], *merged["ablations"]]
    models = {n: runs / n for n in names if (runs / n).is_dir()}
    return collect_env(models=models, tokenizer_dir=runs / "tokenizer")


def split_items(entry: dict) -> tuple[dict, dict]:
    """(the entry without ``items``, its ``items``)."""
    entry = dict(entry)
    return entry, entry.pop("items", {}) or {}


def add_cell_cis(entries: dict, per_seed_items: Sequence[Mapping[str, Mapping]]) -> None:
    """Set ``ppl_ci``, ``switch_ppl_ci`` and ``tasks_ci`` of every entry from the per-seed item cells (in place)."""
    for name, entry in entries.items():
        seeds = [items[name] for items in per_seed_items if name in items]
        if not seeds or not seeds[0]:
            continue
        ppl_ci, switch_ci, tasks_ci = {}, {}, {}
        for cell in seeds[0]:
            if not all(cell in s for s in seeds):
                continue
            ci = multi_seed_cell_ci([s[cell] for s in seeds])
            if cell.startswith("ppl:"):
                ppl_ci[cell[4:]] = ci
            elif cell.startswith("switch:"):
                switch_ci[cell[len("switch:"):]] = ci
            else:
                tasks_ci[cell] = ci
        entry["ppl_ci"] = ppl_ci
        if switch_ci:
            entry["switch_ppl_ci"] = switch_ci
        if tasks_ci or "tasks_ci" not in entry:
            entry["tasks_ci"] = {**entry.get("tasks_ci", {}), **tasks_ci}


def no_signal(methods: Mapping[str, dict], chance: Mapping[str, float], reference: str = "seed") -> list[str]:
    """Tasks where the reference model's CI lower bound is not above chance, or where every method scores 0."""
    out = []
    ref = methods.get(reference, {})
    tasks = sorted({t for e in methods.values() for t in e.get("tasks", {}) if not t.endswith("_std")})
    for t in tasks:
        lo = (ref.get("tasks_ci", {}).get(t) or [None])[0]
        all_zero = all(e.get("tasks", {}).get(t, 0.0) == 0.0 for e in methods.values())
        if all_zero or lo is None or lo <= chance.get(t, 0.0):
            out.append(t)
    return out


def set_avg(entry: dict, signal: Sequence[str]) -> None:
    vals = [entry["tasks"][t] for t in signal if t in entry.get("tasks", {})]
    entry["avg"] = float(sum(vals) / len(vals)) if vals else None


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _frozen_parts(training: Mapping, init_args: Mapping) -> list[str]:
    """The parts an expert kept frozen: as its training.json records them (what ran, overrides included), else
    as its config's ``freeze`` says (runs made before training.json recorded them)."""
    return list(training.get("freeze", init_args.get("freeze")) or [])


def regime(runs_dirs: Sequence[Path], methods: Mapping[str, dict]) -> dict:
    """The ``regime`` block from the run directories of every seed (seed 0 first) and the (seed-mean) methods."""
    runs0 = Path(runs_dirs[0])
    seed_train = _json(runs0 / "seed" / "training.json")
    seed_cfg = _yaml(runs0 / "seed" / "training_config.yaml") or _yaml(runs0 / "configs" / "seed.yaml")
    seed_args = (seed_cfg.get("model") or {}).get("init_args") or {}
    # an imported seed (bts import-gguf) records its size, and its known pretraining tokens, in import.json
    imported = _json(runs0 / "seed" / "import.json")
    params = (seed_train.get("params") or {}).get("total") or imported.get("n_params")
    # an imported seed's pretraining tokens as its source records them (import.json: known, not measured here)
    tokens = seed_train.get("tokens_seen") or (imported.get("source") or {}).get("pretraining_tokens")
    expert_cfgs = {d: _yaml(runs0 / "configs" / f"expert_{d}.yaml") for d in EXPERT_DOMAINS}
    expert_args = {d: (c.get("model") or {}).get("init_args") or {} for d, c in expert_cfgs.items()}
    expert_train = {d: _json(runs0 / f"expert_{d}" / "training.json") for d in EXPERT_DOMAINS}
    # what ran (training.json: command-line overrides included) before what the config file says
    lrs = {expert_train[d].get("lr", a.get("lr")) for d, a in expert_args.items() if a or expert_train[d]}
    expert_lr = lrs.pop() if len(lrs) == 1 else None
    e_tokens = [t.get("tokens_seen") for t in expert_train.values() if t.get("tokens_seen")]
    expert_tokens = int(sum(e_tokens) / len(e_tokens)) if e_tokens else None
    ceilings: dict[str, list[float]] = {}
    for runs in runs_dirs:
        for d, row in _json(Path(runs) / "ceiling" / "ceiling.json").items():
            ceilings.setdefault(d, []).append(ceiling_of(row))
    experts = {}
    seed = methods.get("seed", {}).get("ppl", {})
    for d in EXPERT_DOMAINS:
        e = methods.get(f"expert_{d}", {}).get("ppl", {})
        if d in e and d in seed:
            experts[d] = {"own_ppl_gain": 1.0 - e[d] / seed[d],
                          "ceiling": (sum(ceilings[d]) / len(ceilings[d])) if d in ceilings else None}
    peak = seed_args.get("lr")
    out = {
        "seed_tokens": tokens, "seed_params": params,
        "seed_tokens_per_param": (tokens / params) if tokens and params else None,
        "seed_peak_lr": peak, "seed_final_lr": (peak * seed_args.get("min_lr_ratio", 0.01)) if peak else None,
        "expert_lr": expert_lr, "expert_lr_over_seed_peak": (expert_lr / peak) if expert_lr and peak else None,
        "expert_tokens": expert_tokens,
        "expert_tokens_over_seed_tokens": (expert_tokens / tokens) if expert_tokens and tokens else None,
        "expert_frozen": sorted({p for d, a in expert_args.items() for p in _frozen_parts(expert_train[d], a)}),
        **_stitch_budget(runs0),
        "experts": experts,
        "paper": PAPER_REGIME,
    }
    return out


def _stitch_budget(runs: Path) -> dict:
    """Training tokens of the BTS stage per stitch parameter (``runs/bts/training.json``)."""
    train = _json(runs / "bts" / "training.json")
    tokens, params = train.get("tokens_seen"), (train.get("params") or {}).get("trained")
    return {"stitch_tokens": tokens, "stitch_params": params,
            "stitch_tokens_per_param": (tokens / params) if tokens and params else None}


def regime_markdown(r: Mapping) -> str:
    def f(v, spec=".3g"):
        return "–" if v is None else format(v, spec)

    p = r.get("paper", PAPER_REGIME)
    lines = ["| premise | this run | the paper |", "|---|---|---|",
             (f"| seed tokens per parameter | {f(r.get('seed_tokens_per_param'))} ({f(r.get('seed_tokens'), ',')} "
              f"tokens / {f(r.get('seed_params'), ',')} parameters) | {p['seed_tokens_per_param']} |"),
             (f"| expert lr ÷ seed peak lr | {f(r.get('expert_lr_over_seed_peak'))} ({f(r.get('expert_lr'))} / "
              f"{f(r.get('seed_peak_lr'))}; seed final lr {f(r.get('seed_final_lr'))}) | {p['expert_lr_over_seed_peak']} |"),
             (f"| expert tokens ÷ seed tokens | {f(r.get('expert_tokens_over_seed_tokens'))} | "
              f"{p['expert_tokens_over_seed_tokens']} |"),
             f"| expert parts kept frozen | {', '.join(r.get('expert_frozen') or []) or 'none'} | none (lr 5e-6) |",
             (f"| stitch tokens per stitch parameter | {f(r.get('stitch_tokens_per_param'))} "
              f"({f(r.get('stitch_tokens'), ',')} tokens / {f(r.get('stitch_params'), ',')} parameters) | "
              f"{f(p.get('stitch_tokens_per_param', PAPER_STITCH_TOKENS / PAPER_STITCH_PARAMS), '.3g')} (15B tokens / "
              "~264 M: (2n+1)·d²·K with d 3072, n 3, K 4, our count from the paper's architecture) |")]
    for d, e in (r.get("experts") or {}).items():
        lines.append(f"| {d} expert: own-domain gain (1 − expert ÷ seed ppl) | {f(e.get('own_ppl_gain'), '.3f')} | "
                     f"{p['own_ppl_gain']} |")
        lines.append(f"| {d} expert: head-drift ceiling (hub head on the best linear map ÷ expert ppl) | {f(e.get('ceiling'), '.3f')} | {p['ceiling']} |")
    return "\n".join(lines) + "\n"
