"""Bootstrap confidence intervals for evaluation cells and for paired, multi-seed claims (docs/design.md §7).

Every evaluation cell is a *ratio estimator* over items: ``value = sum(num) / sum(den)`` per item list, shown as
``100 * value`` for accuracies (``kind="pct"``) and as ``exp(value)`` for perplexity (``kind="ppl"``: ``num`` = a
block's summed token NLL, ``den`` = its token count). A multiple-choice item has ``num`` = its credit (1, 1/m for
an m-way tie, 0) and ``den`` = 1; a teacher-forced span task has ``num`` = a document's hits, ``den`` = its spans.

``cell_ci``: percentile bootstrap over items (``B`` resamples, seeded); ``resample_ci`` the same for a statistic
that must be recomputed from the resampled units (corpus-level chrF). ``paired_ci``: the CI of a statistic of
several methods (e.g. "BTS mean ppl - BTM mean ppl") that resamples, per replicate, the test items (one draw per
cell, shared by every method and every seed: all seeds are scored on the same items, so items and seeds are
crossed) and the seeds with replacement, and averages the statistic over the drawn seeds (paired: the same seed's
data, seed model and experts, the same blocks). It covers both item sampling and seed-to-seed training noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

B_DEFAULT = 1000
ALPHA = 0.05


def cell_value(num: Sequence[float], den: Sequence[float], kind: str) -> float:
    """The cell's value: ``exp(sum num / sum den)`` (ppl) or ``100 * sum num / sum den`` (pct)."""
    n, d = float(np.sum(num)), float(np.sum(den))
    if d <= 0:
        return float("nan")
    return float(_transform(np.asarray(n / d), kind))


def _transform(ratio: np.ndarray, kind: str) -> np.ndarray:
    """``kind``: "ppl" (exp of the mean NLL), "pct" (100 x the ratio), "mean" (the ratio itself, e.g. a gate)."""
    if kind == "ppl":
        return np.exp(ratio)
    return 100.0 * ratio if kind == "pct" else ratio


def cell_ci(num: Sequence[float], den: Sequence[float], kind: str, b: int = B_DEFAULT, seed: int = 0,
            alpha: float = ALPHA) -> list[float]:
    """Percentile bootstrap ``[lo, hi]`` of ``cell_value`` over items (resampled with replacement)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n = len(num)
    if n == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng([seed, n]).integers(0, n, size=(b, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = _transform(num[idx].sum(1) / den[idx].sum(1), kind)
    lo, hi = np.nanquantile(vals, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]



def resample_ci(n: int, stat: Callable[[np.ndarray], float], b: int = B_DEFAULT, seed: int = 0,
                alpha: float = ALPHA) -> list[float]:
    """Percentile bootstrap ``[lo, hi]`` of a statistic that is not a ratio of item sums (a corpus-level score
    such as chrF): ``stat(idx)`` recomputes it on the units ``idx``, ``n`` indices drawn with replacement."""
    if n == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng([seed, n])
    vals = np.array([float(stat(rng.integers(0, n, size=n))) for _ in range(b)])
    lo, hi = np.nanquantile(vals, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]

Cells = Mapping[str, Mapping[str, Mapping[str, list]]]
"""``{method: {cell: {"num": [...], "den": [...], "kind": "ppl"|"pct"}}}`` of one seed."""


def statistic_values(cells: Cells, idx: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """``{method: {cell: value}}`` with the items ``idx[cell]`` (all items when None)."""
    out: dict[str, dict[str, float]] = {}
    for method, by_cell in cells.items():
        out[method] = {}
        for cell, it in by_cell.items():
            num, den = np.asarray(it["num"], dtype=np.float64), np.asarray(it["den"], dtype=np.float64)
            if idx is not None and cell in idx:
                num, den = num[idx[cell]], den[idx[cell]]
            out[method][cell] = cell_value(num, den, it["kind"])
    return out


def paired_ci(per_seed: Sequence[Cells], stat: Callable[[dict[str, dict]], float],
              b: int = B_DEFAULT, seed: int = 0, alpha: float = ALPHA) -> tuple[float, list[float], list[float]]:
    """(point estimate = mean over seeds of ``stat``, its bootstrap ``[lo, hi]``, the per-seed values).

    ``stat`` maps ``{method: {cell: value}}`` of one seed to a number (e.g. a difference of two methods' mean
    perplexity); it is also called with arrays of ``b`` bootstrap values per cell, so it must use elementwise
    arithmetic (``np.maximum`` rather than ``max``). Items and seeds are *crossed*, not nested: every seed is scored
    on the same test items, so each replicate draws one resample of a cell's items, shared by every seed and every
    method (paired), and independently a resample of the seeds; the replicate is the mean of the drawn seeds'
    statistic. Item lists of a cell must have the same length for every method (they are the same items); this is
    checked (a cell whose length differs between seeds gets its own draw for that length)."""
    rng = np.random.default_rng([seed, len(per_seed)])
    per_seed_vals, per_seed_reps = [], []
    draws: dict[tuple[str, int], np.ndarray] = {}
    for cells in per_seed:
        sizes: dict[str, int] = {}
        for by_cell in cells.values():
            for cell, it in by_cell.items():
                if sizes.setdefault(cell, len(it["num"])) != len(it["num"]):
                    raise ValueError(f"cell {cell!r}: methods were scored on different numbers of items")
        per_seed_vals.append(float(stat(statistic_values(cells))))
        idx = {}
        for cell, n in sorted(sizes.items()):
            if (cell, n) not in draws:
                draws[(cell, n)] = rng.integers(0, n, size=(b, n))
            idx[cell] = draws[(cell, n)]
        reps: dict[str, dict[str, np.ndarray]] = {}
        for method, by_cell in cells.items():
            reps[method] = {}
            for cell, it in by_cell.items():
                num, den = np.asarray(it["num"], dtype=np.float64), np.asarray(it["den"], dtype=np.float64)
                with np.errstate(divide="ignore", invalid="ignore"):
                    reps[method][cell] = _transform(num[idx[cell]].sum(1) / den[idx[cell]].sum(1), it["kind"])
        per_seed_reps.append(np.asarray(stat(reps), dtype=np.float64) * np.ones(b))
    k = len(per_seed)
    stacked = np.stack(per_seed_reps)  # [k, b]
    drawn = rng.integers(0, k, size=(b, k)) if k > 1 else np.zeros((b, 1), dtype=np.int64)
    replicates = stacked[drawn, np.arange(b)[:, None]].mean(axis=1)
    lo, hi = np.nanquantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(np.mean(per_seed_vals)), [float(lo), float(hi)], per_seed_vals


def verdict(ci: Sequence[float], direction: str) -> str:
    """"holds" when the CI excludes 0 on the claimed side (``direction`` "positive": the statistic > 0 is the
    claim; "negative": < 0), "does not hold" when it excludes 0 on the other side, else "unresolved"."""
    lo, hi = ci
    if direction not in ("positive", "negative"):
        raise ValueError(f"direction must be 'positive' or 'negative', got {direction!r}")
    sign = 1 if direction == "positive" else -1
    lo, hi = sorted((sign * lo, sign * hi))
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "unresolved"


def multi_seed_cell_ci(per_seed: Sequence[Mapping[str, list]], b: int = B_DEFAULT, seed: int = 0,
                       alpha: float = ALPHA) -> list[float]:
    """``[lo, hi]`` of the mean over seeds of one cell (``{"num", "den", "kind"}`` per seed): each replicate draws one
    resample of the items, shared by the seeds (the same test items; crossed, as in ``paired_ci``), and a resample
    of the seeds. With one seed: ``cell_ci``."""
    if len(per_seed) == 1:
        it = per_seed[0]
        return cell_ci(it["num"], it["den"], it["kind"], b=b, seed=seed, alpha=alpha)
    rng = np.random.default_rng([seed, len(per_seed), 7])
    k = len(per_seed)
    vals = np.empty((k, b))
    draws: dict[int, np.ndarray] = {}
    for s, it in enumerate(per_seed):
        num, den = np.asarray(it["num"], dtype=np.float64), np.asarray(it["den"], dtype=np.float64)
        if len(num) not in draws:
            draws[len(num)] = rng.integers(0, len(num), size=(b, len(num)))
        idx = draws[len(num)]
        with np.errstate(divide="ignore", invalid="ignore"):
            vals[s] = _transform(num[idx].sum(1) / den[idx].sum(1), it["kind"])
    drawn = rng.integers(0, k, size=(b, k))
    reps = vals[drawn, np.arange(b)[:, None]].mean(axis=1)
    lo, hi = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]
