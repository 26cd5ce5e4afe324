"""Write ``results/<profile>/``: metrics.json (schema in README), table.md (Table 3 analogue, then the post-switch
perplexity per switch type on domain-switching text), params.md (Table 2 analogue) and ablations.md (Tables 5-8
analogues). Every file is written atomically."""

from __future__ import annotations

from pathlib import Path

from bts.core.io import atomic_write_json, atomic_write_text
from bts.data.domains import DOMAINS

FAMILY_ORDER = ("dense", "upcycling", "merging", "bts")
FAMILY_TITLES = {"dense": "Dense", "upcycling": "Expert upcycling", "merging": "Expert merging", "bts": "BTS"}
# Drawn from metrics.json by bts.pipeline.figures_results (after the metrics, in `bts reproduce`) and shown in the README.
PPL_FIGURE = "figures/ppl_domains.png"
CLAIMS_FIGURE = "figures/claims_forest.png"


def _fmt(v, std=None, digits=2) -> str:
    if v is None:
        return "–"
    s = f"{v:.{digits}f}"
    return s if std is None else f"{s} ± {std:.{digits}f}"


def _task_columns(entries: dict) -> list[str]:
    cols: list[str] = []
    for e in entries.values():
        for k in e.get("tasks", {}):
            if not k.endswith("_std") and k not in cols:
                cols.append(k)
    return cols


def results_table(entries: dict, title: str, no_signal=(), chance: dict | None = None) -> str:
    """Per-domain held-out perplexity (lower is better) and downstream tasks (higher is better); best bold; each
    cell with its bootstrap 95 % CI ``[lo, hi]`` when known. Tasks in ``no_signal`` are marked and not in avg."""
    tasks = _task_columns(entries)
    head = ["method", "family"] + [f"ppl {d}" for d in DOMAINS] + ["ppl mean"] + tasks + (["avg"] if tasks else [])
    rows = []
    for name, e in entries.items():
        ppl = e.get("ppl", {})
        vals = [ppl.get(d) for d in DOMAINS]
        mean = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        row = {"method": name, "family": e.get("family", "")}
        for d, v in zip(DOMAINS, vals):
            row[f"ppl {d}"] = (v, ppl.get(f"{d}_std"), e.get("ppl_ci", {}).get(d))
        row["ppl mean"] = (mean, None, None)
        for t in tasks:
            row[t] = (e.get("tasks", {}).get(t), e.get("tasks", {}).get(f"{t}_std"), e.get("tasks_ci", {}).get(t))
        if tasks:
            row["avg"] = (e.get("avg"), e.get("avg_std"), None)
        rows.append(row)
    best = {}
    for col in head[2:]:
        if col in no_signal:
            continue
        vals = [r[col][0] for r in rows if r[col][0] is not None]
        if vals:
            best[col] = min(vals) if col.startswith("ppl") else max(vals)
    labels = [f"{c} (no signal)" if c in no_signal else c for c in head]
    lines = [f"## {title}", ""]
    if no_signal or chance:
        lines += ["Cells: value [95 % bootstrap CI]" + (" (mean ± std over seeds; CI over seeds and items)"
                                                       if any(r["avg"][1] is not None for r in rows if "avg" in r)
                                                       else "") + ". Chance: " +
                  ", ".join(f"{t} {v:g}" for t, v in (chance or {}).items()) + ". `avg` is the mean of the tasks with "
                  "signal; a task marked *no signal* (the seed's CI lower bound is not above chance, or every method "
                  "scores 0) is left out of it.", ""]
    lines += ["| " + " | ".join(labels) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: FAMILY_ORDER.index(r["family"]) if r["family"] in FAMILY_ORDER else 99)
    for r in order:
        cells = [r["method"], FAMILY_TITLES.get(r["family"], r["family"])]
        for col in head[2:]:
            v, sd, ci = r[col]
            cell = _fmt(v, sd) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and v is not None else "")
            if v is not None and best.get(col) == v:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SWITCH_NOTE = (
    "Perplexity of the tokens after a mid-block domain switch (lower is better): each block is a window of a packed "
    "stream in which documents of domain A (prefix) are followed by documents of domain B, switching at 1/4, 1/2 or "
    "3/4 of the block; every method is scored on the same tokens, each predicted from the whole block before it "
    "(`bts.eval.tasks.switching`). `all` pools every type's post-switch tokens. Cells: value [95 % bootstrap CI].")


def _switch_columns(entries: dict) -> list[str]:
    cols: list[str] = []
    for e in entries.values():
        for k in e.get("switch_ppl", {}):
            if not k.endswith("_std") and k not in cols:
                cols.append(k)
    return (["all"] if "all" in cols else []) + [c for c in cols if c != "all"]


def switch_table(entries: dict, title: str) -> str:
    """Post-switch perplexity per switch type (``switch_ppl``, lower is better) with CIs; best per column bold;
    empty when no entry has it."""
    cols = _switch_columns(entries)
    rows = [(n, e) for n, e in entries.items() if e.get("switch_ppl")]
    if not cols or not rows:
        return ""
    rows.sort(key=lambda r: FAMILY_ORDER.index(r[1].get("family")) if r[1].get("family") in FAMILY_ORDER else 99)
    best = {c: min(e["switch_ppl"][c] for _, e in rows if c in e["switch_ppl"]) for c in cols}
    lines = [f"## {title}", "", SWITCH_NOTE, "", "| method | family | " + " | ".join(cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, e in rows:
        cells = [name, FAMILY_TITLES.get(e.get("family", ""), e.get("family", ""))]
        for c in cols:
            v = e["switch_ppl"].get(c)
            ci = e.get("switch_ppl_ci", {}).get(c)
            cell = _fmt(v, e["switch_ppl"].get(f"{c}_std")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and v is not None
                                                                  else "")
            cells.append(f"**{cell}**" if v is not None and v == best[c] else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def switch_summary(entries: dict) -> str:
    """README table: pooled post-switch perplexity beside the mean single-domain perplexity, per method."""
    rows = [(n, e) for n, e in entries.items() if "all" in e.get("switch_ppl", {})]
    if not rows:
        return ""
    lines = ["| method | post-switch ppl, all types [95 % CI] | mean single-domain ppl |", "|---|---|---|"]
    for name, e in rows:
        ci = e.get("switch_ppl_ci", {}).get("all")
        ppl = [e.get("ppl", {}).get(d) for d in DOMAINS]
        mean = sum(ppl) / len(ppl) if all(v is not None for v in ppl) else None
        lines.append(f"| {name} | {_fmt(e['switch_ppl']['all'])}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                     + f" | {_fmt(mean)} |")
    return "\n".join(lines) + "\n"


def params_table(entries: dict) -> str:
    lines = ["## Parameters (paper Table 2 analogue)", "", "| method | trained | total | active |", "|---|---|---|---|"]
    for name, e in entries.items():
        p = e.get("params", {})
        lines.append(f"| {name} | {p.get('trained', 0):,} | {p.get('total', 0):,} | {p.get('active', 0):,} |")
    return "\n".join(lines) + "\n"


def results_readme(metrics: dict, gates: dict | None) -> str:
    """``results/<profile>/README.md``: the regime, which paper claims hold (with CIs), what ran, how long."""
    from bts.pipeline.claims import claims_markdown
    from bts.pipeline.summary import regime_markdown

    cfg = metrics["config"]
    stage_seconds = metrics.get("stage_seconds", {})
    lines = [
        f"# Reproduction `{metrics['profile']}`",
        "",
        "Produced by `bts reproduce` (`make reproduce`); every number here is recomputed from `metrics.json`, never",
        (
            "edited by hand. Tiny Llama-architecture models on the embedded corpus (CPU): "
            f"d={cfg.get('d_model')}, L={cfg.get('n_layers')}, vocab={cfg.get('vocab_size')}, "
            f"n={cfg.get('n_experts')} experts, K={cfg.get('stitch_layers')} stitch layers "
            f"(init: {cfg.get('stitch_init')}). Seeds: {metrics['seeds']}. Wall time: {metrics['wall_seconds']:.0f} s "
            "(stages reused from an earlier run count as 0)."
        ),
        "",
        "Files: `table.md` (Table 3 analogue), `params.md` (Table 2), `ablations.md` (Tables 5-8), `gates.json` and",
        "`figures/` (gate plots, loss curves), `metrics.json` (machine-readable; schema in docs/reproduce.md).",
        "",
    ]
    if metrics.get("regime"):
        lines += ["## The regime, measured beside the paper's (DESIGN: docs/design.md §7)", "",
                  regime_markdown(metrics["regime"]), ""]
    if metrics.get("claims") is not None:
        lines += ["## Paper claims in this regime", "", claims_markdown(metrics["claims"], len(metrics["seeds"])), ""]
    lines += readme_figures(metrics)
    if any(e.get("switch_ppl") for e in metrics["methods"].values()):
        lines += ["## Domain-switching text", "", SWITCH_NOTE + " Per switch type: `table.md`.", "",
                  switch_summary(metrics["methods"]), ""]
    if metrics.get("no_signal_tasks") is not None:
        chance = metrics.get("chance", {})
        lines += ["## Tasks without signal", "",
                  "A task carries no signal when the seed's 95 % CI lower bound is not above chance, or when every "
                  "method scores 0; it is shown in the tables but left out of `avg`. Here: "
                  + (", ".join(f"`{t}` (chance {chance.get(t, 0):g})" for t in metrics["no_signal_tasks"]) or "none")
                  + ".", ""]
    if gates and gates.get("markdown"):
        lines += ["## Gate analysis (last E2H layer, mean gate per model per domain)", "", gates["markdown"], ""]
    if metrics.get("env"):
        try:
            from bts.pipeline.env import env_markdown

            lines += ["## Environment", "", env_markdown(metrics["env"], heading=False), ""]
        except ImportError:
            pass
    if stage_seconds:
        lines += ["## Stage wall times (seconds; training and evaluation)", "", "| stage | seconds |", "|---|---|"]
        for seed, times in stage_seconds.items():
            for k, v in times.items():
                lines.append(f"| {seed}/{k} | {v:.1f} |")
        lines.append("")
    return "\n".join(lines)


def has_ppl(metrics: dict) -> bool:
    """Whether any method has a held-out perplexity: then ``PPL_FIGURE`` is drawn and shown."""
    return any(e.get("ppl") for e in (metrics.get("methods") or {}).values())


def readme_figures(metrics: dict) -> list[str]:
    """The README lines showing the forest plot of the claims and the per-domain perplexity figure, each only when
    ``bts.pipeline.figures_results.write_metrics_figures`` draws it (the same conditions)."""
    lines = []
    if metrics.get("claims"):
        lines += [f"![Forest plot of the claims: difference, 95 % CI and verdict per claim]({CLAIMS_FIGURE})", ""]
    if has_ppl(metrics):
        lines += ["## Held-out perplexity per method and domain", "",
                  f"![Perplexity per method and domain with 95 % CIs]({PPL_FIGURE})", "",
                  "The numbers are in `table.md` (methods) and `ablations.md`.", ""]
    return lines


def _header(metrics: dict) -> str:
    return (
        f"# Results: profile `{metrics['profile']}`, seeds {metrics['seeds']}\n\n"
        "Produced by `bts reproduce`; never edited by hand. Perplexity on held-out test blocks of each domain.\n\n"
    )


def write_results(results_dir: Path, metrics: dict, gates: dict | None = None) -> None:
    results_dir = Path(results_dir)
    atomic_write_json(results_dir / "metrics.json", metrics)
    header = _header(metrics)
    switching = switch_table(metrics["methods"], "Domain-switching text (post-switch perplexity per switch type)")
    atomic_write_text(results_dir / "table.md", header + results_table(
        metrics["methods"], "Methods (Table 3 analogue)", metrics.get("no_signal_tasks", ()), metrics.get("chance"))
        + ("\n" + switching if switching else ""))
    atomic_write_text(results_dir / "params.md", header + params_table({**metrics["methods"], **metrics["ablations"]}))
    write_ablations(results_dir, metrics)
    atomic_write_text(results_dir / "README.md", results_readme(metrics, gates))


def write_ablations(results_dir: Path, metrics: dict) -> None:
    """``ablations.md``: the reproduction's ablation rows, then every table ``bts sweep`` wrote to ``sweeps/``
    (called by the reproduction and again by each sweep, so a sweep run later is listed without a rerun)."""
    if not metrics.get("ablations"):
        return
    results_dir = Path(results_dir)
    header = _header(metrics)
    sweeps = sorted((results_dir / "sweeps").glob("*.md")) if (results_dir / "sweeps").is_dir() else []
    text = header + results_table(metrics["ablations"], "Ablations", metrics.get("no_signal_tasks", ()),
                                  metrics.get("chance"))
    switching = switch_table(metrics["ablations"], "Ablations on domain-switching text")
    text += ("\n" + switching) if switching else ""
    text += "".join("\n" + f.read_text() for f in sweeps)  # tables written by `bts sweep`
    atomic_write_text(results_dir / "ablations.md", text)
