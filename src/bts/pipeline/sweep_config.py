"""A sweep config (``configs/sweeps/<name>.yaml``): its keys, its points' names and each point's Lightning config.
Shared by the two kinds of sweep: over one Lightning config (``bts.pipeline.sweep``) and over a chain of profile
stages (``bts.pipeline.regime_sweep``)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import yaml

from bts.core.io import BTSError
from bts.pipeline.profile import DEFAULT_RUN_ROOT

SWEEP_KEYS = {"name", "base", "after", "grid", "points", "family", "stages", "eval_tasks", "reference"}


def _set(cfg: dict, dotted: str, value) -> None:
    """Set ``dotted`` in ``cfg``. The key must be in the base config (a typo fails here), unless it starts with ``+``:
    then it is added (a setting the base config leaves at its default, e.g.
    ``+model.init_args.stitch.activation_checkpointing``)
    and only its section must exist."""
    add = dotted.startswith("+")
    node = cfg
    *path, last = dotted.removeprefix("+").split(".")
    for key in path:
        if not isinstance(node.get(key), dict):
            raise BTSError(f"sweep key '{dotted}': '{key}' is not a section of the base config")
        node = node[key]
    if last not in node and not add:
        raise BTSError(f"sweep key '{dotted}' is not in the base config (prefix it with '+' to add a setting the "
                       "base config leaves at its default)")
    node[last] = value


def _slug(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value) or "none"
    return str(value).lower()


def point_name(assignment: dict) -> str:
    """``{"model.init_args.stitch.num_stitch_layers": 4}`` -> ``num_stitch_layers-4`` (a file-safe run name)."""
    return "__".join(f"{key.rsplit('.', 1)[-1]}-{_slug(value)}" for key, value in assignment.items())


def point_config(base: dict, sweep: str, name: str, assignment: dict) -> dict:
    """The base config with ``assignment`` applied and every run-specific path moved under the point's name."""
    cfg = copy.deepcopy(base)
    for key, value in assignment.items():
        _set(cfg, key, value)
    slug = f"sweep_{sweep}__{name}"
    root = f"{DEFAULT_RUN_ROOT}/sweeps/{sweep}/{name}"
    cfg["model"]["init_args"]["output_dir"] = root
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = f"{DEFAULT_RUN_ROOT}/logs/{slug}"
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "init_args" in logger:
        logger["init_args"]["name"] = slug
    for cb in trainer.get("callbacks") or []:
        if cb.get("class_path", "").endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = f"{DEFAULT_RUN_ROOT}/ckpt/{slug}"
    return cfg


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BTSError(f"no sweep config at {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise BTSError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(SWEEP_KEYS))})")
    for key in ("name",) + (() if "stages" in raw else ("base",)):
        if key not in raw:
            raise BTSError(f"{path}: missing key '{key}'")
    if "grid" not in raw and "points" not in raw:
        raise BTSError(f"{path}: missing key 'grid' (or 'points')")
    grid = raw.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise BTSError(f"{path}: 'grid' must map dotted config keys to non-empty lists of values")
    points = raw.get("points")
    if "points" in raw and (not isinstance(points, list) or not points
                            or not all(isinstance(p, dict) and p for p in points)):
        raise BTSError(f"{path}: 'points' must be a non-empty list of mappings from dotted config keys to values")
    if "stages" in raw and "points" in raw:
        raise BTSError(f"{path}: 'points' is for sweeps over a base config, not profile sweeps ('stages')")
    return raw


def sweep_points(sweep: dict) -> list[dict]:
    """Every point's assignment: the product of ``grid`` (each key over its list) and ``points`` (explicit
    assignments, for keys that move together, e.g. a token budget's batch size and sample count); either may be
    absent. Names are distinct (``point_name``) or the sweep is refused."""
    grid = sweep.get("grid") or {}
    keys = list(grid)
    out = [{**dict(zip(keys, values)), **extra}
           for values in itertools.product(*(grid[k] for k in keys)) for extra in sweep.get("points", [{}])]
    names = [point_name(a) for a in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise BTSError(f"sweep {sweep.get('name')}: two points are both named {dup!r}")
    return out
