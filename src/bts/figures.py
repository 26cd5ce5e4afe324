"""Loss curves of every training stage, read back from its TensorBoard logs (``results/<profile>/figures/``)."""

from __future__ import annotations

from pathlib import Path

from bts.io import atomic_path


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` over every event file under ``log_dir`` (later versions override earlier)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(points.items())


def loss_curves(logs_root: Path, stages: list[str], out_png: Path, tag: str = "train/loss", title: str = "") -> bool:
    """One panel of ``tag`` per stage group; returns False when no stage has logged ``tag``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {s: read_scalars(logs_root / s, tag) for s in stages if (logs_root / s).is_dir()}
    series = {s: v for s, v in series.items() if v}
    if not series:
        return False
    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for name, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.set_title(title or tag)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True
