"""Gate analysis of a trained BTS model (paper §4.3): which model does the hub listen to, token by token?

``bts gates --ckpt runs/tiny/bts --tokenizer runs/tiny/tokenizer --out results/tiny [--tensorboard DIR]``

Every Experts-into-Hub (E2H) stitch layer mixes the hub and the experts with a softmax over models per hidden
dimension; ``StitchedLM.record_gates()`` averages it over the hidden dimensions, which gives one weight per model
per token (the weights of one token sum to 1). This module

1. traces those weights (``gate_trace``: eval mode, so no gate dropout; no grad) for
   - **domain prompts**: ``n_prompts`` prompts per domain from the test split (``bts.data.load_split``), chosen
     with a seeded permutation of the records. Records of the math and multilingual domains are short (one problem,
     one UI-string pair), so a prompt starts with the chosen record and, when it is shorter than ``max_tokens``, is
     filled with the next records of the same domain (joined by ``"\\n\\n"``), then truncated to ``max_tokens``
     tokens; the records of the prompts of one domain do not overlap (unless the split has too few records);
   - **context-switching prompts**: blocks of the domain-switching evaluation (``bts.eval.tasks.switching``,
     built by the same function and seed, ``max_tokens`` long): a window of a packed stream in which documents of
     one domain are followed by documents of another, switching at the middle of the block, one prompt per type
     of ``GATE_SWITCH_TYPES`` (general → code, math → general, code → multilingual, multilingual → math); the
     switch position and the two segments' domains are kept. So the figures show the same kind of switch whose
     post-switch tokens the evaluation scores;
2. summarises them (``summarize``): per domain and per E2H layer the mean gate per model, where a prompt's value is
   the mean over its tokens and the domain's value is the mean over its prompts (each prompt counts once); the
   overall mean per model is the mean over **all** domain prompts (each prompt counts once, so with equal prompt
   counts it is the mean of the domain means). For every expert whose name is a domain (``code``, ``math``,
   ``multilingual``; also ``expert_<domain>``) it records whether its mean gate on its own domain's prompts exceeds
   its overall mean (``own_domain_flags``) — the paper's specialisation claim — for the last E2H layer (the one that
   feeds the output) and per E2H layer;
3. draws (matplotlib, Agg canvas, PNG, each file written atomically) under ``<out>/figures/``:
   ``gates_<domain>.png`` (last E2H layer: gate per model over token positions for one representative prompt, plus
   the position-wise mean over the domain's prompts), ``gates_switch_<i>.png`` (one per context-switching prompt,
   boundaries as vertical lines, segment domains labelled) and ``gates_summary.png`` (grouped bars and a heatmap of
   the mean gate per model per domain);
4. writes ``<out>/gates.json`` (schema: ``summarize`` + ``analyze``; includes a markdown table for the results
   README) and, optionally, the figures / scalars / table to TensorBoard (``log_to_tensorboard``).

Errors in the input (missing checkpoint, tokenizer, records; a tokenizer larger than the model's vocabulary) raise
``BTSError`` before anything is written; ``main`` prints them as one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bts.core.io import BTSError, CommandParser, atomic_path, atomic_write_json
from bts.data.domains import DOMAINS
from bts.data.switching import DEFAULT_FRACTIONS, parse_type, switch_blocks_of

FORMAT = "bts-gates"
VERSION = 2
GATE_SWITCH_TYPES: tuple[str, ...] = ("general>code", "math>general", "code>multilingual", "multilingual>math")
"""Switch types of the context-switching prompts, in order: each domain is once a prefix and once a continuation,
and the three kinds of the evaluation's types (general into an expert domain, the reverse, expert to expert)
appear."""
JOIN = "\n\n"
"""Text between two records of the same domain inside one prompt / segment."""


# ------------------------------------------------------------------------------------------------ tracing
def gate_trace(model, input_ids) -> dict:
    """Per-token gate weights of every E2H layer of ``model`` (a ``StitchedLM``) for one sequence.

    ``input_ids``: ``[1, T]`` (or ``[T]``) tensor / list of token ids. Runs in eval mode (no gate dropout) without
    grad and restores the model's train/eval mode. Returns ``{"names": [hub, experts...], "after_layers": [...]
    (1-based layer after which each E2H layer sits), "layers": [np.ndarray [T, n+1] per E2H layer], "last":
    layers[-1]}``; the weights of one token sum to 1 over the models (E2H softmax, averaged over hidden dims).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"gate_trace takes one sequence [1, T], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise BTSError("gate_trace needs at least one token")
    if not any(kind == "e2h" for _, kind in model.placement()):
        raise BTSError("the model has no Experts-into-Hub stitch layer: there are no gates to trace")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.record_gates() as rec:
            model(ids.to(device))
            gates = rec.gates
            names, after = list(rec.names), list(rec.after_layers)
    finally:
        model.train(was_training)
    layers = [g[0].numpy().astype(np.float64) for g in gates]  # [T, n+1] each
    return {"names": names, "after_layers": after, "layers": layers, "last": layers[-1]}


# ------------------------------------------------------------------------------------------------ prompts
def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    from bts.data.tokenizer import encode_batch

    return [list(map(int, ids)) for ids in encode_batch(tokenizer, list(texts))]


def _rng(seed: int, *key) -> np.random.Generator:
    """A generator seeded by ``seed`` and a stable (process-independent) hash of ``key``."""
    return np.random.default_rng([int(seed), zlib.crc32(repr(key).encode("utf-8"))])


class _Pool:
    """The records of one domain in a seeded order, tokenized on demand; ``take(n)`` fills ``n`` tokens."""

    def __init__(self, domain: str, records: Sequence[Mapping], tokenizer, rng: np.random.Generator):
        keep = [i for i, r in enumerate(records) if isinstance(r.get("text"), str) and r["text"].strip()]
        if not keep:
            raise BTSError(f"domain {domain!r} has no records with text")
        self.domain = domain
        self.texts = {i: records[i]["text"] for i in keep}  # index in ``records`` → text
        self.order = [keep[int(j)] for j in rng.permutation(len(keep))]
        self.pos = 0
        self.tokenizer = tokenizer
        self._cache: dict[int, list[int]] = {}
        self.sep = _encode(tokenizer, [JOIN])[0]
        self.wrapped = False

    def _ids(self, i: int) -> list[int]:
        if i not in self._cache:
            self._cache[i] = _encode(self.tokenizer, [self.texts[i]])[0]
        return self._cache[i]

    def _next(self) -> int:
        if self.pos >= len(self.order):
            self.pos = 0
            self.wrapped = True
        i = self.order[self.pos]
        self.pos += 1
        return i

    def take(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """Token ids (``n_tokens`` at most) from the next record(s), and the record indices used."""
        ids: list[int] = []
        used: list[int] = []
        for _ in range(len(self.order)):
            i = self._next()
            rec = self._ids(i)
            if not rec:
                continue
            if ids:
                ids.extend(self.sep)
            ids.extend(rec)
            used.append(i)
            if len(ids) >= n_tokens:
                break
        if not ids:
            raise BTSError(f"domain {self.domain!r}: no record yields any token")
        return ids[:n_tokens], used


def domain_prompts(records: Mapping[str, Sequence[Mapping]], tokenizer, n_prompts: int = 8, seed: int = 0,
                   max_tokens: int = 128) -> dict[str, list[dict]]:
    """``{domain: [{"ids": [...], "records": [indices into records[domain]]}, ...]}``: ``n_prompts`` seeded prompts per domain,
    each filled with consecutive records of its domain up to ``max_tokens`` tokens (see the module docstring)."""
    if n_prompts < 1:
        raise BTSError(f"n_prompts must be >= 1, got {n_prompts}")
    if max_tokens < 1:
        raise BTSError(f"max_tokens must be >= 1, got {max_tokens}")
    out = {}
    for domain, recs in records.items():
        pool = _Pool(domain, recs, tokenizer, _rng(seed, "domain", domain))
        prompts = []
        for _ in range(n_prompts):
            ids, used = pool.take(max_tokens)
            prompts.append({"ids": ids, "records": used})
        out[domain] = prompts
    return out


def switch_prompts(records: Mapping[str, Sequence[Mapping]], tokenizer, n_switch: int = 4, seed: int = 0,
                   types: Sequence[str] = GATE_SWITCH_TYPES, max_tokens: int = 128,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[dict]:
    """Context-switching prompts: blocks of the domain-switching evaluation (``bts.eval.tasks.switching``), built
    by the same function with the same seed, so each is a block that ``evaluate`` scores when ``max_tokens`` is the
    evaluation's ``seq_len`` (128) and ``seed`` its ``EvalConfig.seed``. Prompt ``i`` is of type
    ``types[i % len(types)]`` (types whose two domains both have records), and is that type's
    ``(i // len(types))``-th block switching at the position nearest the middle of the block.

    Returns ``[{"ids": [...], "type": "A>B", "block": index among the type's blocks, "segments": [{"domain",
    "start", "end"}, ...] (token index ranges, end exclusive), "boundaries": [the switch position], "order":
    [A, B]}]``.
    """
    if n_switch <= 0:
        return []
    usable = [t for t in types if all(d in records for d in parse_type(t))]
    if not usable:
        raise BTSError(f"context-switching prompts need records of both domains of a switch type of {list(types)}")
    if max_tokens < 2:
        raise BTSError(f"max_tokens must be >= 2 for a context-switching prompt, got {max_tokens}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BTSError("the tokenizer has no EOS token (context-switching prompts separate documents with it)")
    middle = min(range(len(fractions)), key=lambda k: abs(float(fractions[k]) - 0.5)) if fractions else 0
    picks = [(usable[i % len(usable)], middle + (i // len(usable)) * len(fractions)) for i in range(n_switch)]
    out = []
    for kind, j in picks:
        block = switch_blocks_of(lambda d: records[d], lambda text: _encode(tokenizer, [text])[0], int(eos),
                                 max_tokens, [kind], fractions, j + 1, seed)[kind][j]
        a, b = parse_type(kind)
        n, p = len(block.ids), block.switch
        out.append({"ids": list(block.ids), "type": kind, "block": j,
                    "segments": [{"domain": a, "start": 0, "end": p}, {"domain": b, "start": p, "end": n}],
                    "boundaries": [p], "order": [a, b]})
    return out


# ------------------------------------------------------------------------------------------------ summary
def expert_domain(name: str, domains: Sequence[str]) -> str | None:
    """The domain an expert is named after (``math`` or ``expert_math`` → ``math``), else ``None``."""
    for d in domains:
        if name in (d, f"expert_{d}", f"expert-{d}"):
            return d
    return None


def own_domain_flags(domain_means: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
                     expert_names: Sequence[str]) -> dict[str, dict]:
    """For every expert named after a domain in ``domain_means``: ``{"domain", "own_domain_mean",
    "overall_mean", "margin" (own - overall), "exceeds" (own > overall)}`` — the paper's §4.3 claim."""
    out = {}
    for name in expert_names:
        d = expert_domain(name, list(domain_means))
        if d is None:
            continue
        own, ovr = float(domain_means[d][name]), float(overall[name])
        out[name] = {"domain": d, "own_domain_mean": own, "overall_mean": ovr, "margin": own - ovr,
                     "exceeds": bool(own > ovr)}
    return out


def _as_dict(names: Sequence[str], values) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


def summarize(domain_traces: Mapping[str, Sequence[dict]], switch_traces: Sequence[dict] = (),
              switches: Sequence[dict] = ()) -> dict:
    """Mean gates from ``gate_trace`` results: ``domain_traces = {domain: [trace, ...]}``; optional context-switching
    traces with their prompts (``switch_prompts``) add per-segment means.

    Keys: ``names``, ``hub``, ``experts``, ``e2h_layers`` (after-layer of each E2H layer), ``last_e2h_layer``,
    ``domains`` (per domain: ``n_prompts``, ``n_tokens``, ``mean_gate`` = last E2H layer, ``per_layer`` = list
    aligned with ``e2h_layers``), ``overall`` (same, over all domain prompts), ``specialization`` (last layer,
    ``own_domain_flags``), ``specialization_per_layer``, ``claim_holds`` (every expert named after a domain exceeds;
    ``None`` when no expert is), ``switch`` (per prompt: type, order, n_tokens, boundaries, segments with
    ``mean_gate``), ``markdown``.
    """
    first = next((ts[0] for ts in domain_traces.values() if ts), None)
    if first is None:
        raise BTSError("no traces to summarise")
    names, after = list(first["names"]), list(first["after_layers"])
    n_layers = len(after)
    domains: dict[str, dict] = {}
    all_prompt_means = []  # [P, L, n+1]
    for domain, traces in domain_traces.items():
        if not traces:
            continue
        pm = np.stack([np.stack([layer.mean(axis=0) for layer in t["layers"]]) for t in traces])  # [K, L, n+1]
        all_prompt_means.append(pm)
        mean = pm.mean(axis=0)  # [L, n+1]
        domains[domain] = {
            "n_prompts": len(traces),
            "n_tokens": int(sum(t["layers"][0].shape[0] for t in traces)),
            "mean_gate": _as_dict(names, mean[-1]),
            "per_layer": [{"after_layer": a, "mean_gate": _as_dict(names, mean[li])} for li, a in enumerate(after)],
        }
    overall_arr = np.concatenate(all_prompt_means).mean(axis=0)  # [L, n+1]
    overall = {
        "n_prompts": int(sum(len(p) for p in all_prompt_means)),
        "mean_gate": _as_dict(names, overall_arr[-1]),
        "per_layer": [{"after_layer": a, "mean_gate": _as_dict(names, overall_arr[li])} for li, a in enumerate(after)],
    }
    spec = own_domain_flags({d: v["mean_gate"] for d, v in domains.items()}, overall["mean_gate"], names[1:])
    spec_layers = [
        {"after_layer": a, "flags": own_domain_flags(
            {d: v["per_layer"][li]["mean_gate"] for d, v in domains.items()},
            overall["per_layer"][li]["mean_gate"], names[1:])}
        for li, a in enumerate(after)
    ]
    switch = []
    for prompt, trace in zip(switches, switch_traces):
        last = trace["last"]
        switch.append({
            "type": prompt.get("type", ">".join(prompt["order"])),
            "order": list(prompt["order"]),
            "n_tokens": int(last.shape[0]),
            "boundaries": list(prompt["boundaries"]),
            "segments": [dict(s, mean_gate=_as_dict(names, last[s["start"]:s["end"]].mean(axis=0)))
                         for s in prompt["segments"]],
        })
    summary = {
        "names": names,
        "hub": names[0],
        "experts": names[1:],
        "e2h_layers": after,
        "last_e2h_layer": after[-1],
        "n_e2h_layers": n_layers,
        "domains": domains,
        "overall": overall,
        "specialization": spec,
        "specialization_per_layer": spec_layers,
        "claim_holds": all(v["exceeds"] for v in spec.values()) if spec else None,
        "switch": switch,
        # per prompt, last E2H layer: {domain: [[gate of each model] per prompt]} (bootstrap CIs of the gate claims)
        "prompt_gates": {d: pm[:, -1, :].tolist() for d, pm in zip(
            [d for d, ts in domain_traces.items() if ts], all_prompt_means)},
    }
    summary["markdown"] = markdown_table(summary)
    return summary


def markdown_table(summary: Mapping[str, Any]) -> str:
    """Mean gate per model (columns) per domain (rows) of the last E2H layer, the overall row, and one line per
    expert on whether its own-domain mean exceeds its overall mean."""
    names = summary["names"]
    lines = [
        (
            "Mean E2H gate weight per model (last E2H layer, after transformer layer "
            f"{summary['last_e2h_layer']}; each row sums to 1)."
        ),
        "",
        "| prompts | " + " | ".join(f"{n} (hub)" if i == 0 else n for i, n in enumerate(names)) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for d, v in summary["domains"].items():
        cells = []
        own = [n for n in names[1:] if expert_domain(n, [d]) == d]
        for n in names:
            text = f"{v['mean_gate'][n]:.4f}"
            cells.append(f"**{text}**" if n in own else text)
        lines.append(f"| {d} ({v['n_prompts']}) | " + " | ".join(cells) + " |")
    ov = summary["overall"]
    lines.append(f"| all ({ov['n_prompts']}) | " + " | ".join(f"{ov['mean_gate'][n]:.4f}" for n in names) + " |")
    if summary["specialization"]:
        lines.append("")
        parts = [f"{n}: {'yes' if s['exceeds'] else 'no'} ({s['own_domain_mean']:.4f} on {s['domain']} vs "
                 f"{s['overall_mean']:.4f} overall)" for n, s in summary["specialization"].items()]
        lines.append("Own-domain mean gate > overall mean gate (bold cells): " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ figures
def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot state, no display needed
    return fig


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _ylim(ax, values) -> None:
    top = float(np.nanmax(values)) if np.size(values) else 1.0
    ax.set_ylim(0.0, min(1.0, top * 1.1 + 0.02))


def _uniform_line(ax, n_models: int) -> None:
    """Line plots keep matplotlib's data-driven y-range (small gate differences stay visible) and mark the
    uniform weight ``1 / (n + 1)`` (the identity initialisation) as a dotted reference."""
    ax.axhline(1.0 / n_models, color="0.5", ls=":", lw=1.0, label="uniform")


def _legend_right(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0.0)


def domain_figure(domain: str, traces: Sequence[dict], layer: int = -1):
    """Gate per model over token positions for ``traces[0]`` (the representative prompt) and, with several prompts,
    the position-wise mean over all of them; E2H layer ``layer`` (default the last)."""
    names = traces[0]["names"]
    after = traces[0]["after_layers"][layer]
    colors = _colors(len(names))
    rows = 2 if len(traces) > 1 else 1
    fig = _figure((10, 3.4 * rows))
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    rep = traces[0]["layers"][layer]
    x = np.arange(rep.shape[0])
    for m, name in enumerate(names):
        axes[0].plot(x, rep[:, m], color=colors[m], lw=1.3, label=name + (" (hub)" if m == 0 else ""))
    axes[0].set_title(f"E2H gates after layer {after} — {domain} prompt 1 of {len(traces)}")
    if rows == 2:
        t_max = max(t["layers"][layer].shape[0] for t in traces)
        stack = np.full((len(traces), t_max, len(names)), np.nan)
        for k, t in enumerate(traces):
            g = t["layers"][layer]
            stack[k, : g.shape[0]] = g
        mean = np.nanmean(stack, axis=0)
        xm = np.arange(t_max)
        for m, name in enumerate(names):
            axes[1].plot(xm, mean[:, m], color=colors[m], lw=1.3, label=name)
        axes[1].set_title(f"position-wise mean over {len(traces)} {domain} prompts")
    for ax in axes:
        _uniform_line(ax, len(names))
        ax.set_ylabel("gate weight")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("token position")
    _legend_right(axes[0])
    fig.tight_layout()
    return fig


def switch_figure(prompt: dict, trace: dict, index: int = 0, layer: int = -1):
    """Gate per model over a context-switching prompt; boundaries as vertical lines, segment domains labelled."""
    names = trace["names"]
    g = trace["layers"][layer]
    colors = _colors(len(names))
    fig = _figure((12, 4.2))
    ax = fig.subplots()
    for k, s in enumerate(prompt["segments"]):
        if k % 2:
            ax.axvspan(s["start"] - 0.5, s["end"] - 0.5, color="0.92", zorder=0)
        ax.text((s["start"] + s["end"] - 1) / 2, 1.01, s["domain"], transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=9, fontweight="bold")
    for b in prompt["boundaries"]:
        ax.axvline(b - 0.5, color="0.3", ls="--", lw=1.0)
    x = np.arange(g.shape[0])
    for m, name in enumerate(names):
        ax.plot(x, g[:, m], color=colors[m], lw=1.3, label=name + (" (hub)" if m == 0 else ""))
    ax.set_xlim(-0.5, g.shape[0] - 0.5)
    _uniform_line(ax, len(names))
    ax.set_xlabel("token position")
    ax.set_ylabel("gate weight")
    ax.set_title(f"context switch {index}: E2H gates after layer {trace['after_layers'][layer]} "
                 f"({' → '.join(prompt['order'])})", pad=18)
    _legend_right(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def summary_figure(summary: Mapping[str, Any]):
    """Grouped bars and a heatmap of the mean gate per model per domain (last E2H layer), plus the overall row."""
    names = summary["names"]
    rows = list(summary["domains"]) + ["all"]
    means = [summary["domains"][d]["mean_gate"] for d in summary["domains"]] + [summary["overall"]["mean_gate"]]
    mat = np.array([[m[n] for n in names] for m in means])  # [domains+1, models]
    colors = _colors(len(names))
    fig = _figure((13, 4.5))
    ax_bar, ax_hm = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(names)
    x = np.arange(len(rows))
    for m, name in enumerate(names):
        ax_bar.bar(x + (m - (len(names) - 1) / 2) * width, mat[:, m], width, color=colors[m],
                   label=name + (" (hub)" if m == 0 else ""))
    ax_bar.set_xticks(x, [f"{r}" for r in rows])
    ax_bar.set_xlabel("prompt domain")
    ax_bar.set_ylabel("mean gate weight")
    _ylim(ax_bar, mat)
    ax_bar.legend(fontsize=8, ncol=len(names))
    ax_bar.grid(axis="y", alpha=0.3)
    im = ax_hm.imshow(mat, cmap="viridis", aspect="auto")
    ax_hm.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_hm.set_yticks(range(len(rows)), rows)
    thresh = (mat.max() + mat.min()) / 2
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax_hm.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=8,
                       color="black" if mat[i, j] > thresh else "white")
    fig.colorbar(im, ax=ax_hm, fraction=0.05)
    fig.suptitle(f"Mean E2H gate per model and prompt domain (last E2H layer, after layer "
                 f"{summary['last_e2h_layer']})")
    fig.tight_layout()
    return fig


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------------------------ tensorboard
def log_to_tensorboard(figures: Mapping[str, Any] | str | os.PathLike, log_dir: str | os.PathLike,
                       summary: Mapping[str, Any] | None = None, step: int = 0) -> Path:
    """Write the gate figures to TensorBoard under ``gates/<name>``.

    ``figures``: ``{name: matplotlib Figure}`` (as built by ``analyze``) or a directory of ``gates_*.png`` files.
    With ``summary`` (``gates.json`` content) the mean gates are added as scalars ``gates/<domain>/<model>`` and the
    markdown table as text ``gates/table``.
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        if isinstance(figures, (str, os.PathLike)):
            import matplotlib.image as mpimg

            pngs = sorted(Path(figures).glob("gates_*.png"))
            if not pngs:
                raise BTSError(f"no gates_*.png figures in {figures}")
            for p in pngs:
                img = mpimg.imread(p)[..., :3]
                writer.add_image(f"gates/{p.stem.removeprefix('gates_')}", img, step, dataformats="HWC")
        else:
            for name, fig in figures.items():
                writer.add_figure(f"gates/{name}", fig, step, close=False)
        if summary is not None:
            for d, v in list(summary["domains"].items()) + [("all", summary["overall"])]:
                for n, g in v["mean_gate"].items():
                    writer.add_scalar(f"gates/{d}/{n}", g, step)
            writer.add_text("gates/table", summary["markdown"], step)
        writer.flush()
    finally:
        writer.close()
    return Path(log_dir)


# ------------------------------------------------------------------------------------------------ analyze
def _load_model(ckpt_or_model, device: str | None, allow_changed_models: bool):
    from bts.stitch.model import StitchedLM

    if isinstance(ckpt_or_model, StitchedLM):
        return ckpt_or_model, None
    if not isinstance(ckpt_or_model, (str, os.PathLike)):
        raise BTSError(f"expected a StitchedLM or a stitch checkpoint directory, got {type(ckpt_or_model).__name__}")
    from bts.core.artifacts import artifact_kind
    from bts.dense.modeling import resolve_device
    from bts.stitch.checkpoint import load_stitched

    device = resolve_device(device)  # a bad or missing device is refused before the models load
    ckpt = Path(ckpt_or_model)
    if not ckpt.is_dir():
        raise BTSError(f"stitch checkpoint directory not found: {ckpt}")
    kind = artifact_kind(ckpt)
    if kind != "bts":
        what = "a Hugging Face model directory" if kind == "hf" else f"a {kind!r} artifact"
        raise BTSError(f"{ckpt} is {what}: gate analysis needs a BTS stitch checkpoint (artifact.json kind 'bts', "
                       "e.g. runs/<profile>/bts); evaluate other artifacts with bts eval --model DIR")
    model = load_stitched(ckpt, allow_changed_models=allow_changed_models)
    return model.to(device), str(ckpt)


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from bts.data import load_tokenizer

        if not Path(tokenizer).is_dir():
            raise BTSError(f"tokenizer directory not found: {tokenizer}")
        return load_tokenizer(tokenizer)
    return tokenizer


def _load_records(domains: Sequence[str], cache_dir) -> dict[str, list[dict]]:
    import bts.data

    return {d: bts.data.load_split(d, "test", cache_dir=cache_dir) for d in domains}


def _check_out(out_dir: Path) -> None:
    for p in (out_dir, out_dir / "figures"):
        if p.exists() and not p.is_dir():
            raise BTSError(f"output path exists and is not a directory: {p}")
    if (out_dir / "gates.json").is_dir():
        raise BTSError(f"{out_dir / 'gates.json'} is a directory")


def analyze(ckpt_or_model, tokenizer, out_dir: str | os.PathLike, n_prompts: int = 8, seed: int = 0,
            cache_dir: str | os.PathLike | None = None, tb_log_dir: str | os.PathLike | None = None, *,
            max_tokens: int = 128, n_switch: int = 4, switch_types: Sequence[str] = GATE_SWITCH_TYPES,
            domains: Sequence[str] | None = None,
            records: Mapping[str, Sequence[Mapping]] | None = None, device: str | None = None,
            allow_changed_models: bool = False) -> dict:
    """Trace, summarise, plot and save the gates of a BTS model (see the module docstring).

    Args:
        ckpt_or_model: a stitch checkpoint directory (``load_stitched``) or a ``StitchedLM``.
        tokenizer: a tokenizer directory (``bts.data.load_tokenizer``) or a tokenizer object.
        out_dir: results directory: writes ``gates.json`` and ``figures/gates_*.png``.
        n_prompts: prompts per domain; seed: prompt-selection seed; cache_dir: data cache (``bts.data``).
        tb_log_dir: also log the figures, mean gates and table to TensorBoard there.
        max_tokens: length of a domain prompt and of a context-switching prompt; n_switch: number of
        context-switching prompts; switch_types: their switch types (``switch_prompts``).
        domains: domains to analyse (default all four); records: ``{domain: [{"text": ...}]}`` to use instead of
        the test splits.
        device: where a checkpoint is loaded (default cuda if available); allow_changed_models: see load_stitched.

    Returns the ``gates.json`` content (``summarize`` keys plus ``format``, ``version``, ``checkpoint``,
    ``settings``, ``figures`` (name → path relative to ``out_dir``), ``changed_models``).
    Nothing is written when an input error (``BTSError``) occurs.
    """
    out_dir = Path(out_dir)
    _check_out(out_dir)
    model, ckpt = _load_model(ckpt_or_model, device, allow_changed_models)
    tok = _load_tokenizer(tokenizer)
    records_source = "given" if records is not None else "test split (bts.data.load_split)"
    if records is None:
        records = _load_records(list(domains or DOMAINS), cache_dir)
    elif domains is not None:
        missing = [d for d in domains if d not in records]
        if missing:
            raise BTSError(f"no records given for domain(s) {missing}")
        records = {d: records[d] for d in domains}
    records = {d: list(r) for d, r in records.items()}
    if not records:
        raise BTSError("no domains to analyse")

    prompts = domain_prompts(records, tok, n_prompts=n_prompts, seed=seed, max_tokens=max_tokens)
    switches = switch_prompts(records, tok, n_switch=n_switch, seed=seed, types=switch_types, max_tokens=max_tokens)
    top = max(max(p["ids"]) for ps in prompts.values() for p in ps)
    if switches:
        top = max(top, max(max(s["ids"]) for s in switches))
    if top >= model.vocab_size:
        raise BTSError(f"the tokenizer produces token id {top} but the model's vocab_size is {model.vocab_size}; "
                       "use the tokenizer the models were trained with")

    domain_traces = {d: [gate_trace(model, p["ids"]) for p in ps] for d, ps in prompts.items()}
    switch_traces = [gate_trace(model, s["ids"]) for s in switches]
    summary = summarize(domain_traces, switch_traces, switches)

    figures = {d: domain_figure(d, ts) for d, ts in domain_traces.items()}
    for i, (s, t) in enumerate(zip(switches, switch_traces)):
        figures[f"switch_{i}"] = switch_figure(s, t, i)
    figures["summary"] = summary_figure(summary)

    result = {
        "format": FORMAT,
        "version": VERSION,
        "checkpoint": ckpt,
        "settings": {
            "n_prompts": n_prompts, "seed": seed, "max_tokens": max_tokens, "n_switch": n_switch,
            "switch_types": [s["type"] for s in switches], "switch_positions": [s["boundaries"][0] for s in switches],
            "records": records_source,
            "weighting": "prompt mean = mean over its tokens; domain/overall mean = mean over prompts",
            "prompt_records": {d: [p["records"] for p in ps] for d, ps in prompts.items()},
        },
        **summary,
        "figures": {name: f"figures/gates_{name}.png" for name in figures},
        "changed_models": list(getattr(model, "changed_models", []) or []),
    }

    for name, fig in figures.items():
        save_png(fig, out_dir / result["figures"][name])
    atomic_write_json(out_dir / "gates.json", result)
    if tb_log_dir is not None:
        log_to_tensorboard(figures, tb_log_dir, summary=result)
    return result


# ------------------------------------------------------------------------------------------------ command

def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="bts gates",
        description="Gate analysis of a trained BTS model (paper §4.3): per-token E2H gate weights on prompts of "
        "each domain and on context-switching prompts; writes <out>/gates.json and <out>/figures/gates_*.png.",
    )
    p.add_argument("--ckpt", "--model", dest="ckpt", required=True,
                   help="trained stitch checkpoint directory (artifact.json kind 'bts', bts.json + stitch.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --ckpt, which holds the training tokenizer)")
    p.add_argument("--out", required=True, help="results directory (gates.json, figures/)")
    p.add_argument("--tensorboard", metavar="DIR", help="also write the figures and mean gates to TensorBoard")
    p.add_argument("--n-prompts", type=int, default=8, help="prompts per domain (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt-selection seed (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per domain prompt (default: %(default)s)")
    p.add_argument("--n-switch", type=int, default=4, help="context-switching prompts (default: %(default)s)")
    p.add_argument("--domains", help="comma-separated domains (default: general,code,math,multilingual)")
    p.add_argument("--cache-dir", help="data cache directory (bts.data)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--allow-changed-models", action="store_true",
                   help="use frozen models whose weights differ from the checkpoint manifest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
        domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
        result = analyze(args.ckpt, args.tokenizer or args.ckpt, args.out, n_prompts=args.n_prompts, seed=args.seed,
                         cache_dir=args.cache_dir, tb_log_dir=args.tensorboard, max_tokens=args.max_tokens,
                         n_switch=args.n_switch, domains=domains, device=args.device,
                         allow_changed_models=args.allow_changed_models)
    except BTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(result["markdown"])
    print(f"wrote {Path(args.out) / 'gates.json'} and {len(result['figures'])} figures in "
          f"{Path(args.out) / 'figures'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
