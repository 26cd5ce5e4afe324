"""`bts sweep`: an ablation grid expressed as a config (``configs/sweeps/<name>.yaml``).

Every grid point is the base Lightning config with some dotted keys set (``model.init_args.stitch.num_stitch_layers``)
and its run-specific paths renamed (output dir, TensorBoard log name, checkpoint dir), so each point is a fresh run
in its own log directory. Points run through the reproduction pipeline (same reuse / resume rules, same
evaluation) after the profile stages they depend on; results go to ``results/<profile>/sweeps/<name>.{json,md}``.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import yaml

from bts.io import (
    BTSError,
    CommandParser,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    exclusive_lock,
)
from bts.reproduce import DEFAULT_RUN_ROOT, Pipeline, StageSpec, load_profile

SWEEP_KEYS = {"name", "base", "after", "grid", "family", "stages", "eval_tasks"}


def _set(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        if not isinstance(node.get(key), dict):
            raise BTSError(f"sweep key '{dotted}': '{key}' is not a section of the base config")
        node = node[key]
    if last not in node:
        raise BTSError(f"sweep key '{dotted}' is not in the base config")
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
    for key in ("name", "grid") + (() if "stages" in raw else ("base",)):
        if key not in raw:
            raise BTSError(f"{path}: missing key '{key}'")
    if not isinstance(raw["grid"], dict) or not all(isinstance(v, list) and v for v in raw["grid"].values()):
        raise BTSError(f"{path}: 'grid' must map dotted config keys to non-empty lists of values")
    return raw


def sweep_table(name: str, rows: dict) -> str:
    from bts.report import results_table

    return results_table(rows, f"Sweep `{name}`")


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="bts sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="configs/sweeps/<name>.yaml")
    ap.add_argument("--profile", default="tiny", help="reproduction profile whose stages the points build on")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--jobs", type=int, default=None, help="points run at a time (default: the profile's `jobs`)")
    ap.add_argument("--table-only", action="store_true",
                    help="profile sweeps: rewrite the table from results/<profile>/sweeps/<name>.json, run nothing")
    args = ap.parse_args(argv)
    sweep = load_sweep(args.config)
    profile = load_profile(args.profile)
    if "stages" in sweep:
        from bts.regime_sweep import run_profile_sweep

        if args.table_only:
            from bts.regime_sweep import rewrite_table

            return rewrite_table(sweep, profile)
        return run_profile_sweep(sweep, profile, args.jobs or profile.jobs, progress=not args.no_progress)
    base = yaml.safe_load(Path(sweep["base"]).read_text())
    keys = list(sweep["grid"])
    runs = ensure_writable_dir(profile.runs_dir)
    point_dir = ensure_writable_dir(runs / "sweeps" / sweep["name"])
    stages = []
    for values in itertools.product(*(sweep["grid"][k] for k in keys)):
        assignment = dict(zip(keys, values))
        name = point_name(assignment)
        cfg_path = point_dir / f"{name}.yaml"
        text = yaml.safe_dump(point_config(base, sweep["name"], name, assignment), sort_keys=False)
        atomic_write_text(cfg_path, f"# sweep {sweep['name']} point {name}: bts fit --config {cfg_path}\n" + text)
        stages.append(StageSpec(name=f"sweep_{sweep['name']}__{name}", kind="fit", config=str(cfg_path), family=sweep.get("family", "merging"),
                                after=list(sweep.get("after", [])), report="ablation"))
    needed, todo = set(), list(sweep.get("after", []))
    by_name = {s.name: s for s in profile.stages}
    while todo:
        n = todo.pop()
        if n not in by_name:
            raise BTSError(f"sweep runs after '{n}', which profile {profile.profile} does not have")
        if n not in needed:
            needed.add(n)
            todo += by_name[n].after
    profile.stages = [s for s in profile.stages if s.name in needed] + stages
    for s in profile.stages:
        if s.name in needed:
            s.report = "none"
    with exclusive_lock(runs / ".lock", f"run directory {profile.runs_dir}"):
        out = Pipeline(profile, 0, progress=not args.no_progress).run(args.jobs or profile.jobs)
    rows = out["ablations"]
    results = ensure_writable_dir(Path(profile.results_dir) / "sweeps")
    atomic_write_json(results / f"{sweep['name']}.json", {"sweep": sweep, "points": rows})
    atomic_write_text(results / f"{sweep['name']}.md", sweep_table(sweep["name"], rows))
    metrics_path = Path(profile.results_dir) / "metrics.json"
    if metrics_path.is_file():  # list the new table in ablations.md now, not only at the next `bts reproduce`
        from bts.report import write_ablations

        write_ablations(Path(profile.results_dir), json.loads(metrics_path.read_text()))
    print(f"wrote {results}/{sweep['name']}.md ({len(rows)} points)")
    return 0
