"""Write ``results/<profile>/``: metrics.json (schema in README), table.md (Table 3 analogue), params.md
(Table 2 analogue) and ablations.md (Tables 5-8 analogues). Every file is written atomically."""

from __future__ import annotations

from pathlib import Path

from bts.io import atomic_write_json, atomic_write_text

DOMAINS = ("general", "code", "math", "multilingual")
FAMILY_ORDER = ("dense", "upcycling", "merging", "bts")
FAMILY_TITLES = {"dense": "Dense", "upcycling": "Expert upcycling", "merging": "Expert merging", "bts": "BTS"}


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


def results_table(entries: dict, title: str) -> str:
    """Per-domain held-out perplexity (lower is better) and downstream tasks (higher is better); best bold."""
    tasks = _task_columns(entries)
    head = ["method", "family"] + [f"ppl {d}" for d in DOMAINS] + ["ppl mean"] + tasks + (["avg"] if tasks else [])
    rows = []
    for name, e in entries.items():
        ppl = e.get("ppl", {})
        vals = [ppl.get(d) for d in DOMAINS]
        mean = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        row = {"method": name, "family": e.get("family", "")}
        for d, v in zip(DOMAINS, vals):
            row[f"ppl {d}"] = (v, ppl.get(f"{d}_std"))
        row["ppl mean"] = (mean, None)
        for t in tasks:
            row[t] = (e.get("tasks", {}).get(t), e.get("tasks", {}).get(f"{t}_std"))
        if tasks:
            row["avg"] = (e.get("avg"), e.get("avg_std"))
        rows.append(row)
    best = {}
    for col in head[2:]:
        vals = [r[col][0] for r in rows if r[col][0] is not None]
        if vals:
            best[col] = min(vals) if col.startswith("ppl") else max(vals)
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: FAMILY_ORDER.index(r["family"]) if r["family"] in FAMILY_ORDER else 99)
    for r in order:
        cells = [r["method"], FAMILY_TITLES.get(r["family"], r["family"])]
        for col in head[2:]:
            v, sd = r[col]
            cell = _fmt(v, sd)
            if v is not None and best.get(col) == v:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def params_table(entries: dict) -> str:
    lines = ["## Parameters (paper Table 2 analogue)", "", "| method | trained | total | active |", "|---|---|---|---|"]
    for name, e in entries.items():
        p = e.get("params", {})
        lines.append(f"| {name} | {p.get('trained', 0):,} | {p.get('total', 0):,} | {p.get('active', 0):,} |")
    return "\n".join(lines) + "\n"


def results_readme(metrics: dict, gates: dict | None) -> str:
    """``results/<profile>/README.md``: what ran, how long, and which paper claims hold at this scale."""
    from bts.claims import check_claims, claims_markdown

    cfg = metrics["config"]
    stage_seconds = metrics.get("stage_seconds", {})
    lines = [
        f"# Reproduction `{metrics['profile']}`",
        "",
        "Produced by `bts reproduce` (`make reproduce`); every number here is recomputed from `metrics.json`, never",
        (
            "edited by hand. Tiny Llama-architecture models trained from scratch on the embedded corpus (CPU): "
            f"d={cfg.get('d_model')}, L={cfg.get('n_layers')}, vocab={cfg.get('vocab_size')}, "
            f"n={cfg.get('n_experts')} experts, K={cfg.get('stitch_layers')} stitch layers "
            f"(init: {cfg.get('stitch_init')}). Seeds: {metrics['seeds']}. Wall time: {metrics['wall_seconds']:.0f} s "
            "(stages reused from an earlier run count as 0)."
        ),
        "",
        "Files: `table.md` (Table 3 analogue), `params.md` (Table 2), `ablations.md` (Tables 5-8), `gates.json` and",
        "`figures/` (gate plots, loss curves), `metrics.json` (machine-readable; schema in the top-level README).",
        "",
        "## Paper claims at this scale",
        "",
        claims_markdown(check_claims(metrics, gates)),
    ]
    if gates and gates.get("markdown"):
        lines += ["## Gate analysis (last E2H layer, mean gate per model per domain)", "", gates["markdown"], ""]
    if stage_seconds:
        lines += ["## Stage wall times (seconds; training and evaluation)", "", "| stage | seconds |", "|---|---|"]
        for seed, times in stage_seconds.items():
            for k, v in times.items():
                lines.append(f"| {seed}/{k} | {v:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _header(metrics: dict) -> str:
    return (
        f"# Results: profile `{metrics['profile']}`, seeds {metrics['seeds']}\n\n"
        "Produced by `bts reproduce`; never edited by hand. Perplexity on held-out test blocks of each domain.\n\n"
    )


def write_results(results_dir: Path, metrics: dict, gates: dict | None = None) -> None:
    results_dir = Path(results_dir)
    atomic_write_json(results_dir / "metrics.json", metrics)
    header = _header(metrics)
    atomic_write_text(results_dir / "table.md", header + results_table(metrics["methods"], "Methods (Table 3 analogue)"))
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
    text = header + results_table(metrics["ablations"], "Ablations")
    text += "".join("\n" + f.read_text() for f in sweeps)  # tables written by `bts sweep`
    atomic_write_text(results_dir / "ablations.md", text)
