"""Sweep configs expand to one fresh run (own output, log and checkpoint dirs) per grid point."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bts.core.io import BTSError
from bts.pipeline.sweep_config import load_sweep, point_config, point_name, sweep_points

ROOT = Path(__file__).resolve().parents[1]


SWEEPS = sorted((ROOT / "configs/sweeps").glob("*.yaml"))
PROFILE_SWEEPS = [p for p in SWEEPS if "stages" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("sweep", [p for p in SWEEPS if p not in PROFILE_SWEEPS], ids=lambda p: p.name)
def test_every_point_is_its_own_run(sweep):
    spec = load_sweep(sweep)
    base = yaml.safe_load((ROOT / spec["base"]).read_text())
    seen = set()
    for assignment in sweep_points(spec):
        name = point_name(assignment)
        cfg = point_config(base, spec["name"], name, assignment)
        for key, value in assignment.items():
            node = cfg
            for part in key.removeprefix("+").split(".")[:-1]:
                node = node[part]
            assert node[key.rsplit(".", 1)[-1]] == value
        dirs = (cfg["model"]["init_args"]["output_dir"], cfg["trainer"]["default_root_dir"],
                cfg["trainer"]["logger"]["init_args"]["name"])
        assert not seen & set(dirs), "two points share a directory"
        seen |= set(dirs)
    assert base == yaml.safe_load((ROOT / spec["base"]).read_text()), "the base config must not be mutated"


def test_bad_sweep_keys(tmp_path):
    base = yaml.safe_load((ROOT / "configs/bts/tiny.yaml").read_text())
    with pytest.raises(BTSError, match="not in the base config"):
        point_config(base, "s", "p", {"model.init_args.stitch.bogus": 1})
    # '+' adds a setting the base leaves at its default; its section must exist
    assert "activation_checkpointing" not in base["model"]["init_args"]["stitch"]
    added = point_config(base, "s", "p", {"+model.init_args.stitch.activation_checkpointing": True})
    assert added["model"]["init_args"]["stitch"]["activation_checkpointing"] is True
    assert "activation_checkpointing" not in base["model"]["init_args"]["stitch"]  # the base is not mutated
    with pytest.raises(BTSError, match="'stitches' is not a section"):
        point_config(base, "s", "p", {"+model.init_args.stitches.activation_checkpointing": True})
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\nbase: configs/bts/tiny.yaml\ngrid: {a: [1]}\nextra: 1\n")
    with pytest.raises(BTSError, match="unknown key 'extra'"):
        load_sweep(bad)


def test_ablations_md_lists_sweep_tables_written_after_the_reproduction(tmp_path):
    from bts.pipeline.report import write_ablations

    entry = {"family": "merging", "ppl": {"general": 2.0, "code": 3.0, "math": 4.0, "multilingual": 5.0},
             "tasks": {}, "avg": None, "params": {"trained": 1, "total": 2, "active": 2}}
    metrics = {"profile": "p", "seeds": [0], "ablations": {"bts_k1": entry}}
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "stitch_layers.md").write_text("## Sweep `stitch_layers`\n| K |\n")
    write_ablations(tmp_path, metrics)
    text = (tmp_path / "ablations.md").read_text()
    assert "bts_k1" in text and "## Sweep `stitch_layers`" in text


@pytest.mark.parametrize("sweep", PROFILE_SWEEPS, ids=lambda p: p.name)
def test_profile_sweep_points_are_valid_and_distinct(sweep):
    """A profile sweep names stages of the tiny profile and `<ModelClass>:<dotted.key>` grid keys; every point
    gets its own name (its own run directory)."""
    import itertools

    from bts.pipeline.profile import load_profile
    from bts.pipeline.regime_sweep import _parse_key

    spec = load_sweep(sweep)
    stages = {s.name for s in load_profile(str(ROOT / "configs/reproduce/tiny.yaml")).stages}
    assert set(spec["stages"]) <= stages
    keys = [_parse_key(k) for k in spec["grid"]]
    names = {point_name({d: v for (_, d), v in zip(keys, values)})
             for values in itertools.product(*spec["grid"].values())}
    assert len(names) == len(list(itertools.product(*spec["grid"].values())))
    assert all("/" not in n and " " not in n for n in names)
    with pytest.raises(BTSError, match="ModelClass"):
        _parse_key("model.init_args.lr")


def test_regime_table_rows():
    from bts.pipeline.regime_sweep import regime_row, regime_table

    ppl = {"general": 10.0, "code": 10.0, "math": 10.0, "multilingual": 10.0}
    methods = {"seed": {"ppl": ppl}, "bts": {"ppl": {**ppl, "code": 8.8}}, "btm": {"ppl": {**ppl, "code": 8.0}},
               "expert_code": {"ppl": {**ppl, "code": 8.0}}}
    ceiling = {"code": {"expert_ppl": 8.0, "identity_ppl": 8.4, "best_map_ppl": 8.2}}
    row = regime_row(methods, ceiling)
    assert row["gain_code"] == pytest.approx(0.2) and row["ceiling_code"] == pytest.approx(8.2 / 8.0)
    assert row["bts_over_expert_code"] == pytest.approx(1.1) and row["bts_minus_btm"] == pytest.approx(0.2)
    assert "| `p` | 0.200 |" in regime_table("x", {"p": row})


def test_points_cross_the_grid_and_names_stay_distinct(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nbase: configs/bts/tiny.yaml\ngrid: {+model.init_args.stitch.h2e_gate_init: [half, closed]}\n"
                    "points:\n  - {data.init_args.batch_size: 16, data.init_args.num_train_samples: 1600}\n"
                    "  - {data.init_args.batch_size: 54, data.init_args.num_train_samples: 5400}\n")
    points = sweep_points(load_sweep(spec))
    assert [(p["+model.init_args.stitch.h2e_gate_init"], p["data.init_args.batch_size"]) for p in points] == [
        ("half", 16), ("half", 54), ("closed", 16), ("closed", 54)]
    assert all(p["data.init_args.num_train_samples"] == 100 * p["data.init_args.batch_size"] for p in points)
    assert len({point_name(p) for p in points}) == 4
    only = tmp_path / "o.yaml"
    only.write_text("name: o\nbase: configs/bts/tiny.yaml\npoints: [{data.init_args.batch_size: 8}]\n")
    assert sweep_points(load_sweep(only)) == [{"data.init_args.batch_size": 8}]
    for body, match in [("points: []", "'points' must be a non-empty list"), ("points: [{}]", "'points' must be"),
                        ("", "missing key 'grid'")]:
        bad = tmp_path / "b.yaml"
        bad.write_text(f"name: b\nbase: configs/bts/tiny.yaml\n{body}\n")
        with pytest.raises(BTSError, match=match):
            load_sweep(bad)
    with pytest.raises(BTSError, match="two points are both named"):
        sweep_points({"name": "d", "points": [{"a.b": 1}, {"c.b": 1}]})


def test_stitch_budget_rows_and_table():
    from bts.pipeline.regime_sweep import stitch_budget_row, stitch_budget_table

    ppl = {"general": 10.0, "code": 10.0, "math": 10.0, "multilingual": 10.0}
    refs = {"seed": {"ppl": ppl}, "btm": {"ppl": {**ppl, "code": 8.0}, "switch_ppl": {"all": 12.0}},
            "expert_code": {"ppl": {**ppl, "code": 8.0}}}
    bts = {"ppl": {**ppl, "code": 8.8, "math": 9.0}, "switch_ppl": {"all": 11.5, "code>math": 9.0}}
    training = {"tokens_seen": 204800, "params": {"trained": 114688}}
    row = stitch_budget_row(refs, bts, training, 47.5)
    assert row["bts_over_expert_code"] == pytest.approx(1.1) and "gain_code" not in row
    assert row["bts_minus_btm"] == pytest.approx((8.8 + 9.0 - 8.0 - 10.0) / 4)
    assert row["bts_minus_seed"] == pytest.approx((8.8 + 9.0 - 20.0) / 4)
    assert row["switch_bts_minus_btm"] == pytest.approx(-0.5)
    assert row["stitch_tokens_per_param"] == pytest.approx(1.7857, abs=1e-4)
    table = stitch_budget_table("x", {"p": row})
    assert "| `p` | 1.786 | 1.100 | – | – | -0.050 | -0.550 | -0.500 | 48 |" in table
    missing = stitch_budget_row({"seed": {"ppl": ppl}}, {"ppl": ppl}, None, None)
    assert missing["stitch_tokens_per_param"] is None and "switch_bts_minus_btm" not in missing
