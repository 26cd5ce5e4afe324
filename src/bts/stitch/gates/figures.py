"""Figures of the gate analysis (matplotlib, Agg canvas, PNG written atomically) and their TensorBoard copy: gates over
token positions per domain and per context-switching prompt, and the mean gate per model per domain."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bts.core.io import BTSError, atomic_path


def _figure(figsize):
    # matplotlib (~0.7 s to import) only when drawing: `bts gates --help` and the tracing do without it
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
    from torch.utils.tensorboard import SummaryWriter  # tensorboard's import is slow: only when asked for

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
