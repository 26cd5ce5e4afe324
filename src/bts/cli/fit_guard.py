"""`bts fit` never loses a run: what it does with an output directory that already holds one, trainer values
Lightning would reject, and the line an interrupted fit ends with.

The rule for a `bts fit` whose outputs already exist (docs/reliability.md):

1. ``model.init_args.output_dir`` is not empty: it holds a finished model (``LMTrainingModule`` writes it at the end
   of fit, ``training.json`` last, into a directory renamed into place) or something else the end of this fit would
   replace. Refused (the one output rule of every command, ``bts.core.io.check_output``), one ``error:`` line naming
   a fresh ``--run_dir`` and ``--force``, before anything heavy is imported. Also with ``--ckpt_path``.
2. Otherwise, without ``--ckpt_path``, a ``last.ckpt`` in the directory of the config's ``ModelCheckpoint`` (an
   interrupted run: SIGTERM/SIGINT, ``bts.training.interrupt``, or a kill after a periodic save; or Lightning's SLURM
   ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` when it has more steps) is resumed when it
   was trained with the same configuration (the fingerprint ``InterruptCheckpoint`` stores in every checkpoint equals
   this run's), and one line says so; a ``last.ckpt`` of another configuration (or without a fingerprint) is
   refused, naming ``--ckpt_path`` (resume it anyway) and ``--force``.
3. ``--force``: train from scratch whatever is there; the finished model is replaced only when the new one is
   complete (atomic rename), and the new run's config is saved as ``config.rerun-<n>.yaml`` beside an existing
   ``config.yaml``.

``--force`` is not a Lightning key: ``precheck`` takes it off the command line (``pop_force``) and keeps it here
for the ``bts fit`` of this process (``take_force``), so it never lands in a saved ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bts.core.io import BTSError, check_lightning_checkpoint, describe_dir

_force_requested = False

# keys that change how a run is shown or started, not what it trains: left out of the configuration fingerprint
UNFINGERPRINTED = ("config", "ckpt_path", "weights_only", "verbose", "return_predictions", "print_config",
                   "trainer.enable_progress_bar", "trainer.enable_model_summary")


# --------------------------------------------------------------------------------------------------- precheck
def pop_force(argv: list[str]) -> list[str]:
    """``argv`` without ``--force`` (remembered for ``take_force``)."""
    global _force_requested
    _force_requested = "--force" in argv
    return [a for a in argv if a != "--force"]


def take_force() -> bool:
    """Whether the command line being run had ``--force`` (read once: a later in-process fit starts unforced)."""
    global _force_requested
    forced, _force_requested = _force_requested, False
    return forced


def check_fit_output(output_dir: Any, forced: bool) -> None:
    """``bts fit``'s part of the one output rule (``bts.core.io.check_output``): ``output_dir`` appears, by an atomic
    rename, only when training finishes, so a non-empty one holds a finished model (or something else the end of
    this fit would replace); refused without ``--force``."""
    if not isinstance(output_dir, (str, Path)) or not output_dir or "://" in str(output_dir):
        return
    out = Path(output_dir)
    if not forced and out.is_dir() and any(out.iterdir()):
        raise BTSError(f"refusing to overwrite {out} (model.init_args.output_dir): it holds {describe_dir(out)}; this "
                       "bts fit would train again and replace it: use a fresh --run_dir (or another output_dir), or "
                       "pass --force to retrain")


def _number(value: Any) -> Any:
    """A command-line value as the full parser reads it (YAML), or the value itself from a config file."""
    if isinstance(value, str):
        import yaml

        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fraction_or_count(v: Any) -> bool:
    return (_is_int(v) and v >= 0) or (isinstance(v, float) and 0.0 <= v <= 1.0)


TRAINER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_steps": (lambda v: _is_int(v) and v >= -1, "a non-negative integer or -1 (infinite steps)"),
    "max_epochs": (lambda v: v is None or (_is_int(v) and v >= -1), "a non-negative integer or -1 (no limit)"),
    "accumulate_grad_batches": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "check_val_every_n_epoch": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer or null"),
    "val_check_interval": (lambda v: v is None or _fraction_or_count(v), "a fraction in [0.0, 1.0] or a batch count"),
    **{f"limit_{s}_batches": (lambda v: v is None or _fraction_or_count(v), "a fraction in [0.0, 1.0] or a batch count")
       for s in ("train", "val", "test", "predict")},
}
"""Trainer values Lightning rejects (while building the Trainer, or later, deep in fit: ``accumulate_grad_batches
0`` and ``check_val_every_n_epoch 0`` divide by zero), checked before the model is built. Anything else Lightning rejects when it builds the Trainer
is caught there (``trainer_error``)."""


def check_trainer_values(lookup: Callable[[str], Any]) -> None:
    """``lookup(dotted key)`` gives the effective value (config files, then overrides); values of another type (a
    string where a number belongs) are left to the full parser, which names the expected types."""
    for key, (ok, expected) in TRAINER_RULES.items():
        raw = lookup(f"trainer.{key}")
        if raw is None:
            continue
        value = _number(raw)
        if isinstance(value, (int, float)) and not ok(value):
            raise BTSError(f"trainer.{key} must be {expected}, got {value!r}")


def precheck_fit(argv: list[str], lookup: Callable[[str], Any]) -> list[str]:
    """The static part of the rule (module docstring): ``--force`` taken off, a finished model refused; trainer
    values checked for every Lightning subcommand."""
    if argv[0] == "fit":
        argv = pop_force(argv)
        check_fit_output(lookup("model.init_args.output_dir"), _force_requested)
    elif "--force" in argv:
        raise BTSError(f"--force is an option of bts fit, not of bts {argv[0]}")
    check_trainer_values(lookup)
    return argv


def trainer_error(exc: BaseException) -> BTSError:
    """Lightning's multi-line refusal of a trainer setting as one line."""
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip()) or type(exc).__name__
    return BTSError(f"invalid trainer setting: {text}")


# ---------------------------------------------------------------------------------------- the instantiated run
def config_fingerprint(config: dict) -> str:
    """sha256 of a parsed ``bts fit`` configuration (``cli.config["fit"].as_dict()``) without ``UNFINGERPRINTED``."""
    cfg = json.loads(json.dumps(config, default=str))
    for dotted in UNFINGERPRINTED:
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def checkpoint_fingerprint(ckpt: dict) -> str | None:
    """The configuration fingerprint ``InterruptCheckpoint`` stored in a loaded checkpoint, or None."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and "config_fingerprint" in state:
            return state["config_fingerprint"]
    return None


def resumable_checkpoint(trainer) -> Path | None:
    """The newest (most steps) of the ``last.ckpt`` an interrupted fit saves (``interrupt_checkpoint_path``) and
    the last ``hpc_ckpt_<n>.ckpt`` that Lightning's SLURM auto-requeue saved in ``default_root_dir`` (on SIGUSR1,
    before the job's SIGTERM), or None."""
    from bts.training.interrupt import interrupt_checkpoint_path  # lightning: not for the precheck

    hpc = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"),
                 key=lambda p: int(p.stem.rpartition("_")[2]) if p.stem.rpartition("_")[2].isdigit() else -1)
    found = [p for p in [interrupt_checkpoint_path(trainer), *hpc[-1:]] if p.is_file()]
    if len(found) > 1:
        steps = {}
        for p in found:
            try:
                steps[p] = int(check_lightning_checkpoint(p).get("global_step", -1))
            except BTSError:  # unreadable: reported when it is chosen
                steps[p] = -1
        found.sort(key=lambda p: steps[p], reverse=True)
    return found[0] if found else None


def decide_fit(trainer, model, fit_config: dict, ckpt_path: str | None) -> tuple[str | None, str | None]:
    """Apply the rule to an instantiated ``bts fit`` (after ``precheck_fit``): ``(checkpoint to resume or None, the
    config label for ``mark_resuming`` or None)``; prints the one line saying what it does."""
    from bts.training.interrupt import InterruptCheckpoint

    forced = take_force()
    check_fit_output(getattr(model, "output_dir", None), forced)  # also an output_dir the static check missed
    fingerprint = config_fingerprint(fit_config)
    for cb in trainer.callbacks:
        if isinstance(cb, InterruptCheckpoint):
            cb.config_fingerprint = fingerprint
    last = resumable_checkpoint(trainer)
    if forced:
        print(f"bts fit: --force: training from scratch{f' (not resuming {last})' if last else ''}", file=sys.stderr)
        return None, "rerun"
    if ckpt_path or last is None:
        return None, None
    hint = f"pass --ckpt_path {last} to resume it anyway, --force to start over, or use a fresh --run_dir"
    try:
        ckpt = check_lightning_checkpoint(last)
    except BTSError as e:
        raise BTSError(f"{e}: it is the checkpoint of an interrupted run; pass --force to start over, or use a fresh "
                       "--run_dir") from None
    found = checkpoint_fingerprint(ckpt)
    if found is None:
        raise BTSError(f"{last} holds an earlier run whose configuration is unknown (no fingerprint); {hint}")
    if found != fingerprint:
        raise BTSError(f"{last} holds an earlier run of another configuration; {hint}")
    print(f"bts fit: resuming the interrupted run from {last} (same configuration); --force starts over",
          file=sys.stderr)
    return str(last), "resumed"


def resume_command(args: list[str], checkpoint: Path) -> str:
    """The ``bts fit`` command line ``args`` (as run: ``--run_dir`` already applied) resuming from ``checkpoint``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--ckpt_path":
            skip = True
        elif not a.startswith("--ckpt_path="):
            out.append(a)
    return shlex.join(["bts", *out, "--ckpt_path", str(checkpoint)])
