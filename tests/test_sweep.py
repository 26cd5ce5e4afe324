"""Sweep configs expand to one fresh run (own output, log and checkpoint dirs) per grid point."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bts.io import BTSError
from bts.sweep import load_sweep, point_config, point_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sweep", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
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
    from bts.report import write_ablations

    entry = {"family": "merging", "ppl": {"general": 2.0, "code": 3.0, "math": 4.0, "multilingual": 5.0},
             "tasks": {}, "avg": None, "params": {"trained": 1, "total": 2, "active": 2}}
    metrics = {"profile": "p", "seeds": [0], "ablations": {"bts_k1": entry}}
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "stitch_layers.md").write_text("## Sweep `stitch_layers`\n| K |\n")
    write_ablations(tmp_path, metrics)
    text = (tmp_path / "ablations.md").read_text()
    assert "bts_k1" in text and "## Sweep `stitch_layers`" in text
