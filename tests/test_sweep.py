"""Sweep configs expand to one fresh run (own output, log and checkpoint dirs) per grid point."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bts.core.io import BTSError
from bts.pipeline.sweep_config import load_sweep, point_config, point_name

ROOT = Path(__file__).resolve().parents[1]


SWEEPS = sorted((ROOT / "configs/sweeps").glob("*.yaml"))
PROFILE_SWEEPS = [p for p in SWEEPS if "stages" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("sweep", [p for p in SWEEPS if p not in PROFILE_SWEEPS], ids=lambda p: p.name)
def test_every_point_is_its_own_run(sweep):
    spec = load_sweep(sweep)
    base = yaml.safe_load((ROOT / spec["base"]).read_text())
    import itertools

    keys = list(spec["grid"])
    seen = set()
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        assignment = dict(zip(keys, values))
        name = point_name(assignment)
        cfg = point_config(base, spec["name"], name, assignment)
        node = cfg
        for part in keys[0].split(".")[:-1]:
            node = node[part]
        assert node[keys[0].rsplit(".", 1)[-1]] == values[0]
        dirs = (cfg["model"]["init_args"]["output_dir"], cfg["trainer"]["default_root_dir"],
                cfg["trainer"]["logger"]["init_args"]["name"])
        assert not seen & set(dirs), "two points share a directory"
        seen |= set(dirs)
    assert base == yaml.safe_load((ROOT / spec["base"]).read_text()), "the base config must not be mutated"


def test_bad_sweep_keys(tmp_path):
    base = yaml.safe_load((ROOT / "configs/bts/tiny.yaml").read_text())
    with pytest.raises(BTSError, match="not in the base config"):
        point_config(base, "s", "p", {"model.init_args.stitch.bogus": 1})
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
