"""results/<profile>/figures/: per-domain perplexity and the claims' forest plot drawn from metrics.json alone,
smoothed loss curves of every trained stage, the README showing them, and `python -m bts.pipeline.figures`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bts.core.io import BTSError
from bts.pipeline.figures import loss_figure, loss_groups, main, smooth, write_loss_figures
from bts.pipeline.figures_results import claims_figure, method_order, ppl_figure, write_metrics_figures
from bts.pipeline.report import CLAIMS_FIGURE, PPL_FIGURE, results_readme

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _claim(cid, unit, verdict, diff, ci, per_seed=()):
    return {"id": cid, "claim": f"{cid} text", "source": "Table 3", "verdict": verdict, "diff": diff, "ci": ci,
            "per_seed": list(per_seed), "paper": "Avg 28.1 vs 24.0", "unit": unit}


def _metrics() -> dict:
    """Two domains, five methods of three families (listed out of table order), claims in three units with a
    unit repeated after another (so panels follow the given order, not a grouping), one claim without a CI."""
    def entry(family, general, code, ci=True):
        e = {"family": family, "ppl": {"general": general, "code": code}}
        if ci:
            e["ppl_ci"] = {"general": [general * 0.95, general * 1.05], "code": [code * 0.95, code * 1.05]}
        return e

    return {
        "profile": "toy", "seeds": [0, 1], "config": {"domains": ["general", "code"]},
        "methods": {"seed": entry("dense", 30.0, 20.0), "btm": entry("merging", 31.0, 18.0),
                    "expert_code": entry("dense", 33.0, 15.0), "bam": entry("upcycling", 29.5, 19.0, ci=False),
                    "bts": entry("merging", 29.0, 17.0)},
        "ablations": {},
        "claims": [
            _claim("expert_code_specialises", "ppl", "holds", 5.0, [4.0, 6.0], [4.8, 5.2]),
            _claim("bts_beats_btm", "ppl", "does not hold", -1.0, [-1.5, -0.5], [-0.9, -1.1]),
            _claim("bts_avg_beats_seed", "points", "unresolved", 0.3, [-0.4, 1.0], [0.1, 0.5]),
            _claim("k4_beats_k1", "ppl", "holds", 0.2, None, [0.2, 0.2]),
            _claim("gate_code_own_domain", "gate", "holds", 0.06, [0.04, 0.08]),
        ],
    }


def _ylabels(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.legends[0].get_texts()]


def test_metrics_figures_are_small_deterministic_pngs(tmp_path):
    import matplotlib.image as mpimg

    written = write_metrics_figures(_metrics(), tmp_path / "a")
    assert written == [tmp_path / "a" / PPL_FIGURE, tmp_path / "a" / CLAIMS_FIGURE]
    assert sorted(p.name for p in (tmp_path / "a" / "figures").iterdir()) == ["claims_forest.png", "ppl_domains.png"]
    for p in written:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 300_000
        img = mpimg.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 800
    again = write_metrics_figures(_metrics(), tmp_path / "b")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_forest_plot_orders_and_counts_the_claims_as_given():
    claims = _metrics()["claims"]
    fig = claims_figure(claims)
    assert _ylabels(fig) == [f"{c['id']} (Table 3)" for c in claims]
    # consecutive claims of one unit share a panel; ppl comes back after points instead of being regrouped
    assert [len(ax.get_yticks()) for ax in fig.axes] == [2, 1, 1, 1]
    points = [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() in ("o", "X", "D", "s")]
    assert len(points) == len(claims)
    assert [ln.get_xdata()[0] for ln in points] == [c["diff"] for c in claims]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["holds (3)", "does not hold (1)", "unresolved (1)"] and "per seed" in legend
    for ax in fig.axes:  # the line at 0 in every panel
        assert any(list(ln.get_xdata()) == [0.0, 0.0] for ln in ax.lines)


def test_missing_ci_or_difference_is_drawn_not_raised(tmp_path):
    m = _metrics()
    m["claims"].append(_claim("remove_code_hurts_code_most", "ratio", "unresolved", None, None))
    m["claims"][0]["ci"] = [float("nan"), 6.0]
    fig = claims_figure(m["claims"])
    assert _texts(fig).count("no CI") == 2 and "not computed" in _texts(fig)
    ppl = ppl_figure(m)  # bam has no ppl_ci
    assert "no CI recorded" in _texts(ppl)
    assert len(write_metrics_figures(m, tmp_path)) == 2


def test_ppl_figure_one_panel_per_domain_in_table_order_with_seed_and_expert_marked():
    m = _metrics()
    fig = ppl_figure(m)
    assert [ax.get_title() for ax in fig.axes] == ["general", "code"]
    order = method_order(m["methods"])
    assert order == ["seed", "expert_code", "bam", "btm", "bts"]  # dense, upcycling, merging (table.md's order)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == order
    for ax, d in zip(fig.axes, ["general", "code"]):
        stars = [ln for ln in ax.lines if ln.get_marker() == "*"]
        assert len(stars) == (1 if d == "code" else 0)  # the domain's own expert
        seed_line = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert [ln.get_xdata()[0] for ln in seed_line] == [m["methods"]["seed"]["ppl"][d]]


def test_smooth_keeps_length_and_level_and_damps_noise():
    assert smooth([2.0] * 7) == [2.0] * 7
    assert smooth([1.0, 2.0, 3.0, 4.0], half_window=1) == [1.5, 2.0, 3.0, 3.5]  # the window shrinks at the ends
    rng = random.Random(0)
    raw = [3.0 + rng.gauss(0.0, 0.3) for _ in range(200)]
    out = smooth(raw)
    assert len(out) == len(raw)

    def spread(v):
        return sum((x - 3.0) ** 2 for x in v) / len(v)

    assert spread(out) < spread(raw) / 4


def test_every_stage_is_in_exactly_one_loss_figure():
    stages = ["seed", "expert_code", "expert_math", "expert_multilingual", "expert_routing", "bam_adapters",
              "btx_soft", "bam", "bts", "bts_k1", "bts_no_multilingual", "bts_add_multilingual", "custom"]
    groups = loss_groups(stages)
    assert sorted(s for g in groups.values() for s in g) == sorted(stages)
    assert groups["loss_dense.png"] == ["seed", "expert_code", "expert_math", "expert_multilingual"]
    assert groups["loss_baselines.png"] == ["expert_routing", "bam_adapters", "btx_soft", "bam", "custom"]


def test_loss_curves_from_tensorboard_logs_raw_faint_and_smoothed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    rng = random.Random(1)
    for stage in ("seed", "bam", "bts_k1"):
        w = SummaryWriter(str(tmp_path / "logs" / stage / "version_0"))
        for step in range(9, 400, 10):
            w.add_scalar("train/loss", 4.0 - step / 200 + rng.gauss(0.0, 0.2), step)
        w.close()
    stages = ["seed", "expert_code", "bam", "bts_k1"]  # expert_code trained but logged nothing
    written = write_loss_figures(tmp_path / "logs", stages, tmp_path / "figures")
    assert [p.name for p in written] == ["loss_dense.png", "loss_baselines.png", "loss_bts.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size < 300_000 for p in written)
    series = {"seed": [(10 * i, float(i % 2)) for i in range(40)]}
    fig = loss_figure(series, "train/loss (dense)", missing=["expert_code"])
    raw, smoothed = fig.axes[0].lines
    assert raw.get_alpha() < 0.5 and smoothed.get_linewidth() > raw.get_linewidth()
    assert list(smoothed.get_ydata()) == smooth([v for _, v in series["seed"]])
    assert "no train/loss logged: expert_code" in fig.axes[0].get_title()


def _complete(m: dict) -> dict:
    """As `bts reproduce` writes it: every claim with a CI (the README's claims table prints them)."""
    for c in m["claims"]:
        c["ci"] = c["ci"] or [c["diff"] - 0.1, c["diff"] + 0.1]
    return {**m, "wall_seconds": 1.0}


def test_readme_shows_the_figures_only_when_they_are_drawn(tmp_path):
    m = _complete(_metrics())
    readme = results_readme(m, None)
    assert f"]({CLAIMS_FIGURE})" in readme and f"]({PPL_FIGURE})" in readme
    bare = {**m, "methods": {}, "claims": []}  # e.g. the seed_tiny profile: no method rows, no claims
    assert "figures/" not in results_readme(bare, None).split("## Paper claims")[1]
    assert write_metrics_figures(bare, tmp_path) == []


def test_command_redraws_figures_and_readme_from_a_results_folder(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    m = _complete(_metrics())
    (res / "metrics.json").write_text(json.dumps(m))
    assert main([str(res), "--readme"]) == 0
    readme = (res / "README.md").read_text()
    for rel in (PPL_FIGURE, CLAIMS_FIGURE):
        assert f"]({rel})" in readme and (res / rel).is_file()
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(BTSError, match="no metrics.json"):
        main([str(tmp_path / "elsewhere")])
    with pytest.raises(BTSError, match="--logs"):
        main([str(res), "--logs", str(tmp_path / "no_logs")])


def test_module_entry_point_gives_one_error_line():
    r = subprocess.run([sys.executable, "-m", "bts.pipeline.figures", "/nonexistent/results"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1], check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: no metrics.json")
