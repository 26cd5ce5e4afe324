"""A reproduction profile (``configs/reproduce/<profile>.yaml``): its typed schema and its loading.

Everything a profile says is checked when it loads, before any stage runs: unknown keys (of the profile, of a stage,
of its ``eval`` settings), the ``eval`` values (an ``EvalConfig``) and the task names of ``eval_tasks``,
``ablation_eval_tasks`` and every stage's ``extra_eval_tasks``. A typo fails as one ``error:`` line, not after
hours of training.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from bts.core.io import BTSError
from bts.eval.config import EvalConfig

PROFILES_DIR = Path("configs/reproduce")

DEFAULT_RUN_ROOT = "runs/tiny"
"""The run root the committed stage configs write under (``runs/tiny/seed``, ...); a run relocates it to its own
directory (``Pipeline.resolve_config``, the sweep points of ``bts.pipeline.sweep_config``)."""


@dataclass
class StageSpec:
    name: str
    kind: str  # a key of bts.pipeline.stages.STAGE_KINDS: "fit" | "command" | "pretrained"
    config: str | None = None
    path: str | None = None  # kind "pretrained": the checkpoint directory (with its SHA256SUMS)
    family: str = "dense"
    after: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    report: str = "method"  # "method" | "ablation" | "none" (an intermediate stage, not a table row)
    exclusive: bool = False  # in a parallel run: runs alone, with every core (e.g. the seed: all else waits on it)
    # task groups / metrics evaluated on this stage besides the profile's (e.g. the costly generation tasks on a few
    # stages); the tables' average covers only the tasks every method has
    extra_eval_tasks: list[str] = field(default_factory=list)


@dataclass
class Profile:
    profile: str
    runs_dir: str
    results_dir: str
    stages: list[StageSpec]
    tokenizer_vocab_size: int = 2048
    val_tokens_per_domain: int = 16
    eval_device: str | None = None  # torch device of the evaluation: None = the CPU; auto = the GPU if there is one
    eval_threads: int | None = 1  # batch-1 decoding of tiny models is latency-bound: one thread avoids sync cost
    jobs: int = 1  # stages run at a time (Pipeline.run); `bts reproduce --jobs` overrides
    fit_overrides: list[str] = field(default_factory=list)
    model_overrides: dict[str, list[str]] = field(default_factory=dict)
    command_overrides: dict[str, list[str]] = field(default_factory=dict)  # extra args per subcommand (e.g. ceiling)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the suite's settings (the profile's `eval` mapping)
    eval_tasks: list[str] | None = None  # task groups / metrics evaluated (None: the suite's defaults)
    ablation_eval_tasks: list[str] | None = None  # the same for ablation rows (None: as eval_tasks)
    tokenizer_from: str | None = None  # a committed checkpoint whose tokenizer is used (verified) instead of training one
    # a stage (without `after`) that runs first and whose output's tokenizer is the profile's (an imported seed)
    tokenizer_stage: str | None = None
    # False: a stage's Lightning checkpoints (only needed to resume it mid-way) are deleted once its output is
    # written; with real models they are GBs per stage (optimizer states)
    keep_checkpoints: bool = True
    export: dict | None = None  # {"stage": name, "to": dir}: publish that stage's model + tokenizer as a checkpoint


def profile_path(name_or_path: str) -> Path:
    """``configs/reproduce/<name>.yaml`` for a bare name, else the path as given."""
    path = Path(name_or_path)
    return PROFILES_DIR / f"{name_or_path}.yaml" if not path.suffix else path


def load_profile(name_or_path: str) -> Profile:
    path = profile_path(name_or_path)
    if not path.is_file():
        raise BTSError(f"unknown reproduction profile '{name_or_path}' (no {path})")
    raw = yaml.safe_load(path.read_text()) or {}
    if "base" in raw:  # a profile may extend another one and override some of its keys
        base_name = raw.pop("base")
        base = yaml.safe_load((path.parent / f"{base_name}.yaml").read_text())
        raw = {**base, **raw}
    known = {f.name for f in fields(Profile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BTSError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    stages = []
    for s in raw.get("stages", []):
        bad = sorted(set(s) - {f.name for f in fields(StageSpec)})
        if bad:
            raise BTSError(f"{path}: stage {s.get('name')}: unknown key '{bad[0]}'")
        stages.append(StageSpec(**s))
    raw["stages"] = stages
    raw["eval"] = eval_config(raw.get("eval"), f"{path}: eval")
    profile = Profile(**raw)
    check_tasks(profile, str(path))
    return profile


def eval_config(settings: Mapping | None, where: str) -> EvalConfig:
    """The ``EvalConfig`` of a profile's ``eval`` mapping: every key a field, every value of the field's type."""
    if settings is None:
        return EvalConfig()
    if not isinstance(settings, Mapping):
        raise BTSError(f"{where}: expected a mapping of EvalConfig fields, got {type(settings).__name__}")
    defaults = EvalConfig()
    names = [f.name for f in fields(EvalConfig)]
    for key, value in settings.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(names)}"
            raise BTSError(f"{where}: unknown key '{key}' ({hint})")
        if not _fits(value, getattr(defaults, key), key):
            raise BTSError(f"{where}: {key}: expected {_type_name(getattr(defaults, key), key)}, got {value!r}")
    try:
        return EvalConfig(**settings)
    except BTSError as e:  # the config's own checks (precision, switch settings)
        raise BTSError(f"{where}: {e}") from None


_OPTIONAL = {f.name for f in fields(EvalConfig) if "None" in str(f.type)}


def _fits(value, default, key: str) -> bool:
    if value is None:
        return key in _OPTIONAL
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, tuple):  # YAML gives lists
        return isinstance(value, (list, tuple))
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int) or (default is None and key in _OPTIONAL):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _type_name(default, key: str) -> str:
    kinds = ((bool, "true or false"), (tuple, "a list"), (float, "a number"), (int, "an integer"), (str, "a string"))
    kind = next((name for t, name in kinds if isinstance(default, t)), "an integer")  # None: an optional integer
    return f"{kind} or null" if key in _OPTIONAL else kind


def check_tasks(profile: Profile, where: str) -> None:
    """Every task list of the profile names known task groups / metrics (``bts.eval.suite.resolve_tasks``)."""
    lists = [("eval_tasks", profile.eval_tasks), ("ablation_eval_tasks", profile.ablation_eval_tasks)]
    lists += [(f"stage {s.name}: extra_eval_tasks", s.extra_eval_tasks) for s in profile.stages]
    lists = [(what, tasks) for what, tasks in lists if tasks]
    if not lists:
        return
    # torch and the task modules: imported only for a profile that names tasks
    from bts.eval.suite import resolve_tasks

    for what, tasks in lists:
        try:
            resolve_tasks(tasks)
        except BTSError as e:
            raise BTSError(f"{where}: {what}: {e}") from None
