"""Figures of the results themselves, drawn from ``metrics.json`` alone (no runs needed): the per-domain held-out
perplexity of every method with its 95 % CI (paper Table 3 analogue) and a forest plot of every claim (docs/design.md §7).

Both are written by ``bts reproduce`` after the metrics are computed, and again from a results folder by
``python -m bts.pipeline.figures results/<profile>``. Drawing is on a bare Agg canvas (no pyplot state, no display), and the
PNGs carry no software/version metadata, so the same metrics give the same bytes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from bts.core.io import atomic_path
from bts.pipeline.report import CLAIMS_FIGURE, FAMILY_ORDER, FAMILY_TITLES, PPL_FIGURE, has_ppl

# One colour per family (the tables' grouping); BTS, the method under study, gets its own.
FAMILY_COLORS = {"dense": "#4c72b0", "upcycling": "#dd8452", "merging": "#55a868", "bts": "#c44e52"}
OTHER_COLOR = "#8c8c8c"
VERDICT_STYLE = {  # colour and marker: a verdict reads apart in colour and in shape (colour-blind readers)
    "holds": ("#2e7d32", "o"),
    "does not hold": ("#c62828", "X"),
    "unresolved": ("#757575", "D"),
}
UNKNOWN_VERDICT = ("#757575", "s")
UNIT_TITLES = {"ppl": "perplexity", "points": "accuracy points", "ratio": "perplexity ratio", "gate": "gate weight"}


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` atomically as a 256-colour PNG: a flat-colour plot loses nothing visible and the file shrinks
    about threefold (results are committed). No ``Software`` tag, so the bytes do not change with the matplotlib
    version alone; median-cut quantisation is deterministic."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path = Path(path)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return path


def _finite(x) -> bool:
    """A plottable number (numpy scalars included; None, NaN, inf and bools are not)."""
    try:
        return not isinstance(x, (bool, str)) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _interval(ci) -> tuple[float, float] | None:
    """A usable ``[lo, hi]`` or None (absent, malformed or not finite)."""
    try:
        lo, hi = ci
    except (TypeError, ValueError):
        return None
    if _finite(lo) and _finite(hi):
        return float(min(lo, hi)), float(max(lo, hi))
    return None


def _group(name: str, entry: Mapping) -> str:
    return "bts" if name == "bts" else str(entry.get("family", ""))


def method_order(methods: Mapping[str, Mapping]) -> list[str]:
    """The order of ``table.md``: families in ``FAMILY_ORDER``, the run's order within a family."""
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(methods, key=lambda n: rank.get(str(methods[n].get("family", "")), len(rank)))


def domains_of(metrics: Mapping) -> list[str]:
    domains = list((metrics.get("config") or {}).get("domains") or [])
    if not domains:  # an older metrics.json: the domains the methods were scored on
        for e in (metrics.get("methods") or {}).values():
            domains += [d for d in e.get("ppl") or {} if not d.endswith("_std") and d not in domains]
    return domains


def ppl_figure(metrics: Mapping):
    """One panel per domain: each method's held-out perplexity (lower is better) with its 95 % bootstrap CI.

    Rows are the methods in the tables' order, coloured by family; the seed's value is a dashed line through the
    panel and the domain's own expert (``expert_<domain>``) a star, so "does the expert specialise, and does BTS
    keep it" (paper §3, Table 3) reads off each panel. A missing CI leaves the point without whiskers (hollow)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    methods = metrics.get("methods") or {}
    order = method_order(methods)
    domains = domains_of(metrics)
    n = len(order)
    fig = new_figure(max(11.0, 3.4 * len(domains) + 1.6), 0.3 * n + 2.2)
    axes = fig.subplots(1, len(domains), sharey=True, squeeze=False)[0]
    y = {name: i for i, name in enumerate(order)}
    no_ci = False
    for ax, d in zip(axes, domains):
        seed = (methods.get("seed", {}).get("ppl") or {}).get(d)
        if _finite(seed):
            ax.axvline(seed, color="0.35", ls="--", lw=1.0, zorder=1)
        for name in order:
            e = methods[name]
            v = (e.get("ppl") or {}).get(d)
            if not _finite(v):
                continue
            color = FAMILY_COLORS.get(_group(name, e), OTHER_COLOR)
            ci = _interval((e.get("ppl_ci") or {}).get(d))
            if ci is not None:
                ax.errorbar(v, y[name], xerr=[[max(v - ci[0], 0.0)], [max(ci[1] - v, 0.0)]], fmt="none",
                            ecolor=color, elinewidth=1.6, capsize=2.5, zorder=2)
            else:
                no_ci = True
            marker, size = ("*", 13) if name == f"expert_{d}" else ("s", 7) if name == "seed" else \
                ("D", 7) if name == "bts" else ("o", 6)
            ax.plot(v, y[name], marker=marker, ms=size, color=color, mec="black" if name in ("seed", "bts") else
                    color, mfc=color if ci is not None else "white", mew=1.0, zorder=3, ls="none")
        ax.set_title(d)
        ax.set_xlabel("perplexity (lower is better)")
        ax.grid(axis="x", alpha=0.3)
        for k in range(1, n):  # a thin rule between families
            if _group(order[k], methods[order[k]]) != _group(order[k - 1], methods[order[k - 1]]):
                ax.axhline(k - 0.5, color="0.8", lw=0.8)
    axes[0].set_yticks(range(n), order)
    for label in axes[0].get_yticklabels():
        if label.get_text() in ("seed", "bts"):
            label.set_fontweight("bold")
    axes[0].set_ylim(n - 0.5, -0.5)  # the first method on top, like the tables
    groups = []
    for name in order:
        g = _group(name, methods[name])
        if g not in groups:
            groups.append(g)
    handles = [Patch(color=FAMILY_COLORS.get(g, OTHER_COLOR), label=FAMILY_TITLES.get(g, g or "other"))
               for g in groups]
    handles += [Line2D([], [], color="0.35", ls="--", label="seed's perplexity"),
                Line2D([], [], marker="*", ms=11, color="0.3", ls="none", label="the domain's own expert")]
    if no_ci:
        handles.append(Line2D([], [], marker="o", mfc="white", color="0.3", ls="none", label="no CI recorded"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    seeds = metrics.get("seeds") or [0]
    over = f"mean over {len(seeds)} seeds; CI over seeds and items" if len(seeds) > 1 else "CI over test blocks"
    # the methods are scored on the same blocks, so overlapping CIs still allow a clear paired difference
    fig.suptitle(f"Held-out perplexity per domain, {metrics.get('profile', '')} ({over}; 95 % bootstrap)\n"
                 "paired differences between methods: the claims' forest plot", fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    return fig


def _label(c: Mapping) -> str:
    return f"{c.get('id', '?')} ({c['source']})" if c.get("source") else str(c.get("id", "?"))


def _runs_of_units(claims: Sequence[Mapping]) -> list[tuple[str, list[int]]]:
    """Consecutive claims of one unit share a panel: differences in different units never share an axis, and the
    claims stay in the order given."""
    runs: list[tuple[str, list[int]]] = []
    for i, c in enumerate(claims):
        unit = str(c.get("unit", ""))
        if runs and runs[-1][0] == unit:
            runs[-1][1].append(i)
        else:
            runs.append((unit, [i]))
    return runs


def claims_figure(claims: Sequence[Mapping], title: str = ""):
    """A forest plot of ``claims`` (``metrics.json`` ``claims``), one row each, in the order given, top to bottom.

    Each claim is a difference whose sign is the claim (> 0: the paper's direction; ``bts.pipeline.claims``): the point is
    the difference, the whiskers its 95 % paired-bootstrap CI, colour and marker the verdict (holds: the CI
    excludes 0 on the paper's side), small dots the per-seed values, and the paper's own figure is printed on the
    right. A claim without a CI is drawn hollow and marked "no CI"; one without a difference, "not computed"."""
    from matplotlib.lines import Line2D

    runs = _runs_of_units(claims)
    n = len(claims)
    fig = new_figure(14.0, 0.3 * n + 0.75 * len(runs) + 1.0)
    axes = fig.subplots(len(runs), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [len(r[1]) + 1.2 for r in runs]})[:, 0]
    for ax, (unit, idx) in zip(axes, runs):
        spans = [0.0]
        for row, i in enumerate(idx):
            c = claims[i]
            color, marker = VERDICT_STYLE.get(c.get("verdict"), UNKNOWN_VERDICT)
            diff, ci = c.get("diff"), _interval(c.get("ci"))
            if ci is not None and _finite(diff):
                ax.errorbar(diff, row, xerr=[[max(diff - ci[0], 0.0)], [max(ci[1] - diff, 0.0)]], fmt="none",
                            ecolor=color, elinewidth=1.8, capsize=3, zorder=2)
                spans += list(ci)
            per_seed = [v for v in c.get("per_seed") or [] if _finite(v)]
            if len(per_seed) > 1:
                ax.plot(per_seed, [row + 0.22] * len(per_seed), ls="none", marker=".", ms=3.5, color="0.25",
                        zorder=3)
                spans += per_seed
            if _finite(diff):
                ax.plot(diff, row, marker=marker, ms=7, color=color, mfc=color if ci is not None else "white",
                        ls="none", zorder=4)
                spans.append(diff)
                if ci is None:
                    ax.annotate("no CI", (diff, row), xytext=(7, 0), textcoords="offset points", va="center",
                                fontsize=7, color="0.3")
            else:
                ax.annotate("not computed", (0.0, row), xytext=(7, 0), textcoords="offset points", va="center",
                            fontsize=7, color="0.3")
            paper = textwrap.fill(f"paper: {c.get('paper', '–')}", 48)
            ax.text(1.01, row, paper, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=7,
                    color="0.25", linespacing=0.95)
        lo, hi = min(spans), max(spans)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.axvspan(0.0, hi + pad, color="#e8f5e9", zorder=0)  # the paper's side of 0
        ax.axvline(0.0, color="black", lw=1.0, zorder=1)
        ax.set_ylim(len(idx) - 0.5, -0.9)  # first claim on top; headroom for the panel's unit label
        ax.set_yticks(range(len(idx)), [_label(claims[i]) for i in idx], fontsize=8)
        ax.tick_params(axis="x", labelsize=7, pad=1)
        ax.text(0.005, 0.985, f"difference in {UNIT_TITLES.get(unit, unit or 'units')} ({unit or '?'}); "
                "> 0 is the paper's direction", transform=ax.transAxes, va="top", fontsize=7.5, style="italic")
        ax.grid(axis="x", alpha=0.3)
    counts = {v: sum(c.get("verdict") == v for c in claims) for v in VERDICT_STYLE}
    handles = [Line2D([], [], marker=m, color=col, ls="none", ms=7, label=f"{v} ({counts[v]})")
               for v, (col, m) in VERDICT_STYLE.items()]
    handles += [Line2D([], [], color="0.4", lw=1.8, label="95 % CI")]
    if any(len(c.get("per_seed") or []) > 1 for c in claims):
        handles.append(Line2D([], [], marker=".", color="0.25", ls="none", label="per seed"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.45 / fig.get_figheight()))
    fig.suptitle(title or f"Paper claims in this regime ({n})", y=1.0 - 0.08 / fig.get_figheight(), va="top")
    fig.subplots_adjust(left=0.27, right=0.72, top=1.0 - 0.85 / fig.get_figheight(),
                        bottom=0.35 / fig.get_figheight(), hspace=0.3)
    return fig


def write_metrics_figures(metrics: Mapping, results_dir: str | Path) -> list[Path]:
    """Draw the figures ``metrics`` has data for under ``results_dir`` (``report.PPL_FIGURE``,
    ``report.CLAIMS_FIGURE``); returns the paths written."""
    results_dir = Path(results_dir)
    written = []
    if has_ppl(metrics):
        written.append(save_png(ppl_figure(metrics), results_dir / PPL_FIGURE))
    if metrics.get("claims"):
        seeds = metrics.get("seeds") or [0]
        over = f"{len(seeds)} seeds, paired bootstrap over seeds and items" if len(seeds) > 1 else \
            "1 seed, paired bootstrap over items"
        title = f"Paper claims in this regime, {metrics.get('profile', '')}: difference and 95 % CI ({over})"
        written.append(save_png(claims_figure(metrics["claims"], title), results_dir / CLAIMS_FIGURE))
    return written
