"""``results/<profile>/figures/``: training-loss curves of every trained stage (read back from its TensorBoard logs)
and, through ``bts.pipeline.figures_results``, the figures of ``metrics.json`` (per-domain perplexity, forest plot of the
claims).

``bts reproduce`` writes all of them. From a results folder, without rerunning anything::

    python -m bts.pipeline.figures results/tiny                       # the metrics.json figures
    python -m bts.pipeline.figures results/tiny --logs runs/tiny/logs # and the loss curves, from the stages' logs
    python -m bts.pipeline.figures results/tiny --readme              # and README.md, so that it shows them
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bts.core.io import BTSError, CommandParser, atomic_write_text
from bts.data.domains import EXPERT_DOMAINS
from bts.pipeline.figures_results import new_figure, save_png, write_metrics_figures

LOSS_GROUPS = ("loss_dense.png", "loss_baselines.png", "loss_bts.png")


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


def smooth(values: Sequence[float], half_window: int | None = None) -> list[float]:
    """Centred moving mean over ``2 h + 1`` logged points (fewer at the ends), ``h`` ≈ 5 % of the points by default.

    Centred rather than an exponential average: the baselines log only ~10 points, and an EMA would lag their
    curve by a visible fraction of the run."""
    n = len(values)
    h = max(1, round(n / 20)) if half_window is None else max(0, half_window)
    out = []
    for i in range(n):
        window = values[max(0, i - h): i + h + 1]
        out.append(sum(window) / len(window))
    return out


def loss_groups(stages: Sequence[str]) -> dict[str, list[str]]:
    """Every stage in exactly one loss figure (``LOSS_GROUPS``), in the order given: the seed and the experts, the
    baselines, and BTS with its ablations."""
    groups: dict[str, list[str]] = {g: [] for g in LOSS_GROUPS}
    dense = {"seed", *(f"expert_{d}" for d in EXPERT_DOMAINS)}
    for s in stages:
        g = "loss_dense.png" if s in dense else "loss_bts.png" if s == "bts" or s.startswith("bts_") else \
            "loss_baselines.png"
        groups[g].append(s)
    return groups


def loss_figure(series: dict[str, list[tuple[int, float]]], title: str, missing: Sequence[str] = (),
                tag: str = "train/loss"):
    """``(step, value)`` series of each stage in one panel: the raw logged values faint, their moving mean
    (``smooth``) on top in the same colour; ``missing`` stages (trained, nothing logged) are named in the title."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    fig = new_figure(9.0, 4.8)
    ax = fig.subplots()
    for k, (name, pts) in enumerate(series.items()):
        steps, values = [p[0] for p in pts], [p[1] for p in pts]
        color = cmap(k % 10)
        ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
        ax.plot(steps, smooth(values), color=color, lw=1.8, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(tag)
    ax.set_title(title + (f"\n(no {tag} logged: {', '.join(missing)})" if missing else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, title="moving mean; raw faint", title_fontsize=8)
    fig.tight_layout()
    return fig


def loss_curves(logs_root: Path, stages: Sequence[str], out_png: Path, tag: str = "train/loss",
                title: str = "") -> bool:
    """``loss_figure`` of ``stages`` read from ``logs_root/<stage>``; returns False (no file) when none has logged
    ``tag``."""
    logs_root = Path(logs_root)
    series = {s: read_scalars(logs_root / s, tag) if (logs_root / s).is_dir() else [] for s in stages}
    missing = [s for s, v in series.items() if not v]
    series = {s: v for s, v in series.items() if v}
    if not series:
        return False
    save_png(loss_figure(series, title or tag, missing, tag), out_png)
    return True


def write_loss_figures(logs_root: Path, stages: Sequence[str], figures_dir: Path) -> list[Path]:
    """The loss figures of ``stages`` (the trained stages, in the profile's order) under ``figures_dir``."""
    written = []
    for name, group in loss_groups(stages).items():
        out = Path(figures_dir) / name
        if group and loss_curves(logs_root, group, out, title=f"train/loss ({name[5:-4]})"):
            written.append(out)
    return written


def logged_stages(logs_root: Path, order: Sequence[str] = ()) -> list[str]:
    """The stage directories under ``logs_root`` holding TensorBoard events: those in ``order`` first, in its order,
    then the rest by name (the stages that ``read_scalars`` finds no ``train/loss`` in are dropped when drawn)."""
    found = sorted(p.name for p in Path(logs_root).iterdir() if p.is_dir() and p.name not in ("reproduce", "gates")
                   and any(p.rglob("events.out.tfevents.*")))
    return [s for s in order if s in found] + [s for s in found if s not in order]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BTSError(f"no {path.name} in {path.parent} (a results folder written by `bts reproduce`)") from None
    except (OSError, ValueError) as e:
        raise BTSError(f"{path} is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BTSError(f"{path} is not a JSON object")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="python -m bts.pipeline.figures",
                       description="Redraw results/<profile>/figures/ from its metrics.json (and the loss curves "
                       "from the stages' TensorBoard logs), without rerunning anything.")
    ap.add_argument("results_dir", type=Path, help="a results folder holding metrics.json, e.g. results/tiny")
    ap.add_argument("--logs", type=Path, default=None,
                    help="the run's TensorBoard log root (e.g. runs/tiny/logs): also redraw the loss curves")
    ap.add_argument("--readme", action="store_true",
                    help="also rewrite README.md from metrics.json and gates.json, so that it shows the figures")
    args = ap.parse_args(argv)
    metrics = _read_json(args.results_dir / "metrics.json")
    if not isinstance(metrics.get("methods", {}), dict) or not isinstance(metrics.get("claims", []), list):
        raise BTSError(f"{args.results_dir / 'metrics.json'} has no methods/claims of a `bts reproduce` run")
    if args.logs is not None and not args.logs.is_dir():
        raise BTSError(f"--logs {args.logs}: not a directory")
    written = write_metrics_figures(metrics, args.results_dir)
    if args.logs is not None:
        order = [*(metrics.get("methods") or {}), *(metrics.get("ablations") or {})]
        written += write_loss_figures(args.logs, logged_stages(args.logs, order), args.results_dir / "figures")
    if args.readme:
        from bts.pipeline.report import results_readme

        gates = args.results_dir / "gates.json"
        atomic_write_text(args.results_dir / "README.md",
                          results_readme(metrics, _read_json(gates) if gates.is_file() else None))
        written.append(args.results_dir / "README.md")
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BTSError as e:  # the one-line error of the `bts` commands (this module runs outside bts.cli.main)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
