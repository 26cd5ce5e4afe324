"""The kinds of stage a profile lists (``StageSpec.kind``), as a registry: kind -> how to prepare it (resolve its
config, hash it: cheap) and how to run it (train / build it, or reuse its output).

* ``fit``: a Lightning config, trained by ``bts fit`` in this process (seed, experts, BTS, trained baselines); an
  interrupted one resumes from its ``last.ckpt``;
* ``command``: a project subcommand, ``bts <args...>`` (merges, ``stitch-remove``, ``ceiling``, ``import-gguf``);
* ``pretrained``: a committed checkpoint (``path``), verified against its SHA256SUMS and copied.

A stage's hash covers its resolved config, its arguments and the hashes of the stages it runs after, so a changed
input reruns it and every stage after it (docs/design.md §6).
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bts.cli import lightning as lightning_cli
from bts.cli.main import main as bts_main
from bts.core.io import BTSError, check_lightning_checkpoint, config_hash
from bts.dense import pinned
from bts.pipeline.profile import StageSpec
from bts.pipeline.state import RunState


@dataclass(frozen=True)
class Prepared:
    """A stage resolved for running: its hash, output path, argv and checkpoint directory."""

    hash: str
    output: Path | None
    args: list[str]
    ckpt_dir: Path | None = None


@dataclass(frozen=True)
class StageKind:
    prepare: Callable[[RunState, StageSpec], Prepared]
    run: Callable[[RunState, StageSpec, Prepared], Path]


# --- fit ---------------------------------------------------------------------------------------------------------
def fit_args(run: RunState, stage: StageSpec, cfg_path: Path) -> tuple[list[str], dict]:
    """The ``bts fit`` argv of a stage (seed, the profile's overrides, the stage's args) and its parsed config."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cls = cfg["model"]["class_path"].rsplit(".", 1)[-1]
    args = ["fit", "--config", str(cfg_path), f"--seed_everything={run.seed}"] + seed_overrides(cfg, run.seed)
    args += list(run.p.fit_overrides) + list(run.p.model_overrides.get(cls, [])) + list(stage.args)
    return args, cfg


def seed_overrides(cfg: dict, seed: int) -> list[str]:
    """For seed ``s > 0``: every integer ``seed`` / ``*_seed`` init argument of the model and the data module
    (the config's value, else the class's default) is shifted by ``s``. ``seed_everything`` alone would not vary
    a run: the weight init, the routers' init and the data order have their own seeds. Shifting defaults too
    keeps a module's and a data module's ``seed`` equal (Lightning refuses to merge differing hparams). Seed 0
    keeps the configs exactly as written."""
    if seed == 0:
        return []
    out = []
    for section in ("model", "data"):
        node = cfg.get(section) or {}
        seeds = _seed_params(node.get("class_path"))
        seeds.update({k: v for k, v in (node.get("init_args") or {}).items() if _is_seed(k, v)})
        out += [f"--{section}.init_args.{k}={v + seed}" for k, v in seeds.items()]
    return out


def _is_seed(name: str, value) -> bool:
    return (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not isinstance(value, bool)


def _seed_params(class_path: str | None) -> dict[str, int]:
    """``{name: default}`` of the integer seed parameters of ``class_path.__init__`` (empty if it cannot import)."""
    if not class_path or "." not in class_path:
        return {}
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return {}  # the Lightning CLI reports a bad class_path itself, with a better message
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if _is_seed(p.name, p.default)}


def _ckpt_dir(cfg: dict) -> Path | None:
    for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
        if cb.get("class_path", "").endswith("ModelCheckpoint"):
            d = cb.get("init_args", {}).get("dirpath")
            return Path(d) if d else None
    return None


def prepare_fit(run: RunState, stage: StageSpec) -> Prepared:
    cfg_path = run.resolve_config(stage)
    args, cfg = fit_args(run, stage, cfg_path)
    output = Path(cfg["model"]["init_args"]["output_dir"])
    h = config_hash({"cfg": cfg_path.read_text(), "args": args, "deps": [run.hashes[d] for d in stage.after],
                     "tok": run.hashes.get("tokenizer")})
    return Prepared(h, output, args, _ckpt_dir(cfg))


def run_fit(run: RunState, stage: StageSpec, prep: Prepared) -> Path:
    h, output, args, ckpt_dir = prep.hash, prep.output, list(prep.args), prep.ckpt_dir
    if run._done(stage.name, h, output):
        run.log(f"{stage.name}: reused ({output})")
        return output
    rec = run._record(stage.name)
    resume = None
    # --force means a fresh run: never resume it from its (possibly finished) last checkpoint
    forced = stage.name in run.force
    if not forced and rec and rec.get("hash") == h and ckpt_dir and (ckpt_dir / "last.ckpt").is_file():
        resume = ckpt_dir / "last.ckpt"
        try:
            check_lightning_checkpoint(resume)
            run.log(f"{stage.name}: resuming from {resume}")
        except BTSError as e:
            run.log(f"{stage.name}: cannot resume ({e}); restarting the stage")
            resume = None
    if resume is None and ckpt_dir and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    run._mark(stage.name, h, "started")
    # not part of the stage hash (a display setting): stages report progress as lines (bts.training.progress), which
    # read well in a console and in the stage logs of a parallel run, where a bar would not
    args.append("--trainer.enable_progress_bar=false")
    run.log(f"{stage.name}: bts {' '.join(args)}")
    t = time.perf_counter()
    cli = lightning_cli.run_lightning(args[1:], run=False)
    # a log dir without a versioned logger may hold the interrupted/earlier run's config.yaml: keep it, and save
    # this run's beside it
    lightning_cli.mark_resuming(cli.trainer, "resumed" if resume else "rerun")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume) if resume else None,
                    weights_only=True)
    run.timings[stage.name] = time.perf_counter() - t
    if not output.exists():
        raise BTSError(f"stage {stage.name} finished without writing {output}")
    run._mark(stage.name, h, "done", seconds=round(run.timings[stage.name], 1))
    if not run.p.keep_checkpoints and ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return output


# --- command -----------------------------------------------------------------------------------------------------
def prepare_command(run: RunState, stage: StageSpec) -> Prepared:
    """A project subcommand stage: ``bts <args...>`` (``{runs}`` in args is this run's directory), with
    ``--config <resolved copy>`` appended when the stage names a config. The output is ``--out`` or the
    config's ``out`` key."""
    args = [a.replace("{runs}", run.runs.as_posix()) for a in stage.args]
    args += [str(a) for a in run.p.command_overrides.get(args[0], [])] if args else []
    cfg_text = ""
    output = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if stage.config:
        cfg_path = run.resolve_config(stage)
        cfg_text = cfg_path.read_text()
        args += ["--config", str(cfg_path)]
        output = output or Path(yaml.safe_load(cfg_text)["out"])
    h = config_hash({"args": args, "cfg": cfg_text, "deps": [run.hashes[d] for d in stage.after]})
    return Prepared(h, output, args)


def run_command(run: RunState, stage: StageSpec, prep: Prepared) -> Path:
    if run._done(stage.name, prep.hash, prep.output):
        run.log(f"{stage.name}: reused")
        return prep.output
    run.log(f"{stage.name}: bts {' '.join(prep.args)}")
    t = time.perf_counter()
    rc = bts_main(list(prep.args))
    if rc != 0:
        raise BTSError(f"stage {stage.name} failed (exit {rc})")
    run.timings[stage.name] = time.perf_counter() - t
    run._mark(stage.name, prep.hash, "done", seconds=round(run.timings[stage.name], 1))
    return prep.output


# --- pretrained --------------------------------------------------------------------------------------------------
def prepare_pretrained(run: RunState, stage: StageSpec) -> Prepared:
    if not stage.path:
        raise BTSError(f"stage {stage.name}: kind 'pretrained' needs a 'path'")
    return Prepared(config_hash({"pinned": pinned.verify(stage.path)}), run.runs / stage.name, [])


def run_pretrained(run: RunState, stage: StageSpec, prep: Prepared) -> Path:
    """A committed checkpoint (``stage.path``), verified against its SHA256SUMS and copied to ``<runs>/<name>``."""
    if run._done(stage.name, prep.hash, prep.output):
        run.log(f"{stage.name}: reused ({prep.output})")
        return prep.output
    run.log(f"{stage.name}: from the pinned checkpoint {stage.path} (sha256 verified)")
    pinned.install(stage.path, prep.output)
    run._mark(stage.name, prep.hash, "done", pinned=stage.path)
    return prep.output


STAGE_KINDS: dict[str, StageKind] = {
    "fit": StageKind(prepare_fit, run_fit),
    "command": StageKind(prepare_command, run_command),
    "pretrained": StageKind(prepare_pretrained, run_pretrained),
}
