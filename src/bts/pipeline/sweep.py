"""`bts sweep`: an ablation grid expressed as a config (``configs/sweeps/<name>.yaml``).

Every grid point is the base Lightning config with some dotted keys set (``model.init_args.stitch.num_stitch_layers``)
and its run-specific paths renamed (output dir, TensorBoard log name, checkpoint dir), so each point is a fresh run
in its own log directory. Points run through the reproduction pipeline (same reuse / resume rules, same
evaluation) after the profile stages they depend on; results go to ``results/<profile>/sweeps/<name>.{json,md}``.

Optional keys: ``points`` (explicit assignments, crossed with ``grid``: keys that move together), ``eval_tasks``
(what every row is evaluated on; default: the profile's ablation tasks) and ``reference`` (profile stages evaluated
beside the points, e.g. seed, experts, BTM: the table is then the stitch-budget table of
``bts.pipeline.regime_sweep.stitch_budget_table``, each point against them).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bts.core.io import (
    BTSError,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    exclusive_lock,
)
from bts.pipeline.profile import StageSpec, load_profile
from bts.pipeline.run import Pipeline
from bts.pipeline.sweep_config import load_sweep, point_config, point_name, sweep_points


def sweep_table(name: str, rows: dict) -> str:
    from bts.pipeline.report import results_table

    return results_table(rows, f"Sweep `{name}`")


def sweep_command(config: str, profile: str = "tiny", no_progress: bool = False, jobs: int | None = None,
                  table_only: bool = False) -> int:
    """an ablation grid over one Lightning config (configs/sweeps/<name>.yaml)

    Args:
        config: the sweep, configs/sweeps/<name>.yaml
        profile: reproduction profile whose stages the points build on
        no_progress: hide progress bars
        jobs: points run at a time (default: the profile's `jobs`)
        table_only: profile sweeps: rewrite the table from results/<profile>/sweeps/<name>.json, run nothing
    """

    sweep = load_sweep(config)
    profile = load_profile(profile)  # the name given, now the profile it names
    if "stages" in sweep:
        from bts.pipeline.regime_sweep import run_profile_sweep

        if table_only:
            from bts.pipeline.regime_sweep import rewrite_table

            return rewrite_table(sweep, profile)
        return run_profile_sweep(sweep, profile, jobs or profile.jobs, progress=not no_progress)
    base = yaml.safe_load(Path(sweep["base"]).read_text())
    if "eval_tasks" in sweep:  # a typo fails now, not after the points have trained
        from bts.eval.suite import resolve_selection

        resolve_selection(sweep["eval_tasks"])
        profile.eval_tasks = profile.ablation_eval_tasks = list(sweep["eval_tasks"])
    runs = ensure_writable_dir(profile.runs_dir)
    point_dir = ensure_writable_dir(runs / "sweeps" / sweep["name"])
    stages, assignments = [], {}
    for assignment in sweep_points(sweep):
        name = point_name(assignment)
        assignments[f"sweep_{sweep['name']}__{name}"] = (name, assignment)
        cfg_path = point_dir / f"{name}.yaml"
        text = yaml.safe_dump(point_config(base, sweep["name"], name, assignment), sort_keys=False)
        atomic_write_text(cfg_path, f"# sweep {sweep['name']} point {name}: bts fit --config {cfg_path}\n" + text)
        stages.append(StageSpec(name=f"sweep_{sweep['name']}__{name}", kind="fit", config=str(cfg_path), family=sweep.get("family", "merging"),
                                after=list(sweep.get("after", [])), report="ablation"))
    reference = list(sweep.get("reference", []))
    needed, todo = set(), list(sweep.get("after", [])) + reference
    by_name = {s.name: s for s in profile.stages}
    while todo:
        n = todo.pop()
        if n not in by_name:
            raise BTSError(f"sweep needs stage '{n}', which profile {profile.profile} does not have")
        if n not in needed:
            needed.add(n)
            todo += by_name[n].after
    profile.stages = [s for s in profile.stages if s.name in needed] + stages
    for s in profile.stages:
        if s.name in needed:
            s.report = "method" if s.name in reference else "none"
    with exclusive_lock(runs / ".lock", f"run directory {profile.runs_dir}"):
        out = Pipeline(profile, 0, progress=not no_progress).run(jobs or profile.jobs)
    rows = out["ablations"]
    results = ensure_writable_dir(Path(profile.results_dir) / "sweeps")
    if reference:
        _write_stitch_budget(sweep, out, assignments, runs, results)
    else:
        atomic_write_json(results / f"{sweep['name']}.json", {"sweep": sweep, "points": rows})
        atomic_write_text(results / f"{sweep['name']}.md", sweep_table(sweep["name"], rows))
    metrics_path = Path(profile.results_dir) / "metrics.json"
    if metrics_path.is_file():  # list the new table in ablations.md now, not only at the next `bts reproduce`
        from bts.pipeline.report import write_ablations

        write_ablations(Path(profile.results_dir), json.loads(metrics_path.read_text()))
    print(f"wrote {results}/{sweep['name']}.md ({len(rows)} points)")
    return 0


def _write_stitch_budget(sweep: dict, out: dict, assignments: dict, runs: Path, results: Path) -> None:
    """The stitch-budget table (points against the ``reference`` stages) and its JSON: rows, each point's
    assignment, metrics (without per-item scores), ``training.json`` and stage seconds, and the references."""
    from bts.pipeline.regime_sweep import stitch_budget_row, stitch_budget_table

    def lean(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if k != "items"}

    points, raw = {}, {}
    for stage, entry in out["ablations"].items():
        name, assignment = assignments[stage]
        output = runs / "sweeps" / sweep["name"] / name
        training = json.loads((output / "training.json").read_text()) if (output / "training.json").is_file() else None
        record = runs / ".stages" / f"{stage}.json"  # the stage's wall seconds, also when it was reused
        seconds = json.loads(record.read_text()).get("seconds") if record.is_file() else None
        points[name] = stitch_budget_row(out["methods"], entry, training, seconds)
        raw[name] = {"assignment": assignment, "metrics": lean(entry), "training": training, "seconds": seconds}
    reference = {m: lean(e) for m, e in out["methods"].items()}
    atomic_write_json(results / f"{sweep['name']}.json",
                      {"sweep": sweep, "points": points, "runs": raw, "reference": reference})
    atomic_write_text(results / f"{sweep['name']}.md", stitch_budget_table(sweep["name"], points))
