"""`bts reproduce`: the whole paper at laptop scale, one resumable pipeline (docs/design.md §6).

data -> tokenizer -> seed -> experts -> baselines -> BTS -> ablations -> evaluation -> results/<profile>/.
Each stage is listed in ``configs/reproduce/<profile>.yaml``. A stage is reused when its output exists and its
recorded hash (its resolved config, the overrides, and the hashes of the stages it depends on) matches; an
interrupted training stage resumes from its last Lightning checkpoint (loaded with ``weights_only=True``; a
truncated or unreadable ``last.ckpt`` is discarded and the stage restarts).

Safety: one ``bts reproduce`` per run directory at a time (a second one fails at once); ``results_dir`` holding a
``metrics.json`` of another profile is refused unless ``--force-results`` (results of different configurations
are never silently mixed or overwritten); stitch checkpoints whose frozen models changed are refused unless
``--allow-changed-models``, and then every affected metrics entry carries ``"changed_models"``.

The parts: the profile (``bts.pipeline.profile``), one seed's run (``bts.pipeline.run``), the stage kinds
(``bts.pipeline.stages``), the parallel task graph (``bts.pipeline.scheduler``), ``metrics.json``
(``bts.pipeline.summary``), tables and figures (``bts.pipeline.report``, ``bts.pipeline.figures_results``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bts.cli import config_check
from bts.core.io import BTSError, ensure_writable_dir, exclusive_lock
from bts.eval import harness_import
from bts.offline.node import activate
from bts.pipeline.figures import write_loss_figures
from bts.pipeline.figures_results import write_metrics_figures
from bts.pipeline.profile import PROFILES_DIR, Profile, load_profile
from bts.pipeline.report import write_results
from bts.pipeline.run import Pipeline


def reproduce_command(profile: str = "tiny", seeds: int = 1, force: list[str] | None = None,
                      no_progress: bool = False, jobs: int | None = None, force_results: bool = False,
                      allow_changed_models: bool = False, bundle: str | None = None) -> int:
    """run the whole paper at laptop scale, one resumable pipeline (docs/design.md §6)

    Stages are reused when their recorded hash matches; an interrupted training stage resumes from its last
    checkpoint. Examples:

        bts reproduce                               # the tiny profile: results/tiny
        bts reproduce --profile smol --bundle DIR   # SmolLM2-135M on a GPU node without network

    Args:
        profile: configs/reproduce/<profile>.yaml or a path to a profile
        seeds: number of seeds; with more than one, every float is the mean with a *_std beside it
        force: stage names to rerun even if reusable
        no_progress: hide progress bars
        jobs: independent stages run at a time, each in its own process with cpu_count/jobs torch threads
            (default: the profile's `jobs`)
        force_results: write into a results_dir that holds metrics.json of another profile
        allow_changed_models: evaluate stitch checkpoints whose frozen models changed (recorded as changed_models)
        bundle: an offline bundle folder (bts bundle): verified, then used instead of the network; as $BTS_BUNDLE
    """
    if bundle:  # before any check or stage: a missing or corrupt file is one error line
        activate(bundle)
    if seeds < 1:
        raise BTSError(f"--seeds must be >= 1 (got {seeds})")
    if jobs is not None and jobs < 1:
        raise BTSError(f"--jobs must be >= 1 (got {jobs})")
    loaded = load_profile(profile)
    force = list(force or [])
    known = ["tokenizer", *(s.name for s in loaded.stages)]
    if set(force) - set(known):
        raise BTSError(f"--force: unknown stage {min(set(force) - set(known))!r} (stages of profile "
                       f"{loaded.profile}: {', '.join(known)})")
    check_accelerator(loaded)
    check_harness(loaded)
    results_dir = ensure_writable_dir(loaded.results_dir)
    ensure_writable_dir(loaded.runs_dir)
    with exclusive_lock(Path(loaded.runs_dir) / ".lock", f"run directory {loaded.runs_dir}"):
        if not force_results:
            check_results_dir(results_dir, loaded.profile)
        return _reproduce(loaded, results_dir, seeds=seeds, force=force, progress=not no_progress,
                          jobs=jobs or loaded.jobs, allow_changed_models=allow_changed_models)


def check_accelerator(profile: Profile) -> None:
    """A profile written for a GPU (``--trainer.accelerator=gpu``) on a machine without one: refuse it before any
    stage runs, and say what to run instead (the one check, ``bts.cli.config_check.check_accelerator``)."""
    asked = [o.replace(" ", "=").split("=", 1)[1] for o in profile.fit_overrides
             if o.replace(" ", "=").startswith("--trainer.accelerator=")]
    smoke = PROFILES_DIR / f"{profile.profile}_smoke.yaml"
    hint = f"run --profile {smoke.stem} on CPU" if smoke.is_file() else "run it on a machine with a GPU"
    for accelerator in asked:
        config_check.check_accelerator(accelerator, f"profile {profile.profile}: --trainer.accelerator", hint)


def check_harness(profile: Profile) -> None:
    """A profile with lm-eval stages on a machine where lm-eval cannot be imported (not installed, or a package it
    imports missing): refuse it before the first stage rather than after the experts have trained."""
    if any(s.kind == "command" and "--harness" in s.args for s in profile.stages):
        harness_import.check_importable()


def check_results_dir(results_dir: Path, profile: str) -> None:
    """Refuse a results directory whose ``metrics.json`` was produced by another profile (another configuration:
    the tables would mix or overwrite its results)."""
    path = Path(results_dir) / "metrics.json"
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("profile")
    except (OSError, ValueError, AttributeError):
        raise BTSError(f"{path} exists but is not a readable metrics.json; move it away or pass --force-results") \
            from None
    if previous != profile:
        raise BTSError(f"{path} holds results of profile {previous!r}, not {profile!r}; use another results_dir or "
                       "pass --force-results to overwrite them")


def _reproduce(profile: Profile, results_dir: Path, *, seeds: int, force: list[str], progress: bool, jobs: int,
               allow_changed_models: bool) -> int:
    from bts.pipeline.summary import build_metrics  # torch (bootstrap intervals, the head-drift ceiling)

    t0 = time.perf_counter()
    outs, runs_dirs, gates = [], [], []
    for s in range(seeds):
        pipe = Pipeline(profile, s, force, progress=progress, allow_changed_models=allow_changed_models)
        outs.append(pipe.run(jobs))
        runs_dirs.append(pipe.runs)
        # the gate analysis of every seed's BTS feeds the gate claims; seed 0's also writes the figures
        gates.append(write_figures(profile, results_dir, profile.eval_threads) if s == 0
                     else gate_summary(pipe.runs, profile.eval_threads))
    metrics = build_metrics(profile.profile, outs, runs_dirs, gates, jobs=jobs, started=t0,
                            allow_changed_models=allow_changed_models)
    write_metrics_figures(metrics, results_dir)  # before the README, which shows them
    write_results(results_dir, metrics, gates[0])
    print(f"wrote {results_dir}/metrics.json and tables in {metrics['wall_seconds']:.0f} s")
    return 0


def write_figures(profile: Profile, results_dir: Path, threads: int | None) -> dict | None:
    """Loss curves of every trained stage and the gate analysis of the BTS model (seed 0's run); returns gates.json.
    The figures of the metrics themselves come later, from metrics.json (``bts.pipeline.figures_results``)."""
    runs = Path(profile.runs_dir)
    write_loss_figures(runs / "logs", [s.name for s in profile.stages if s.kind == "fit"], results_dir / "figures")
    if not (runs / "bts" / "bts.json").is_file():
        return None
    return _gates(runs, results_dir, threads, tb_log_dir=runs / "logs" / "gates")


def gate_summary(runs: Path, threads: int | None) -> dict | None:
    """The gate analysis of ``runs/bts`` (no figures kept), for the gate claims of seeds after the first."""
    if not (Path(runs) / "bts" / "bts.json").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return _gates(Path(runs), tmp, threads)


def _gates(runs: Path, out_dir, threads: int | None, tb_log_dir: Path | None = None) -> dict:
    """``bts.stitch.gates.analysis.analyze`` of ``runs/bts`` with ``threads`` torch threads (restored after)."""
    import torch

    from bts.stitch.gates.analysis import analyze  # torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return analyze(runs / "bts", runs / "tokenizer", out_dir, tb_log_dir=tb_log_dir)
    finally:
        torch.set_num_threads(before)
