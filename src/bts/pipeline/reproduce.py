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
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bts.core.io import (
    BTSError,
    CommandParser,
    atomic_write_json,
    atomic_write_text,
    check_lightning_checkpoint,
    config_hash,
    ensure_writable_dir,
    exclusive_lock,
)
from bts.data.domains import DOMAINS

DEFAULT_RUN_ROOT = "runs/tiny"


@dataclass
class StageSpec:
    name: str
    kind: str  # "fit" | "command" | "pretrained" (a committed checkpoint, verified and copied: ``path``)
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
    eval: dict = field(default_factory=dict)
    eval_tasks: list[str] | None = None  # task groups / metrics evaluated (None: the suite's defaults)
    ablation_eval_tasks: list[str] | None = None  # the same for ablation rows (None: as eval_tasks)
    tokenizer_from: str | None = None  # a committed checkpoint whose tokenizer is used (verified) instead of training one
    # a stage (without `after`) that runs first and whose output's tokenizer is the profile's (an imported seed)
    tokenizer_stage: str | None = None
    # False: a stage's Lightning checkpoints (only needed to resume it mid-way) are deleted once its output is
    # written; with real models they are GBs per stage (optimizer states)
    keep_checkpoints: bool = True
    export: dict | None = None  # {"stage": name, "to": dir}: publish that stage's model + tokenizer as a checkpoint


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path)
    if not path.suffix:
        path = Path("configs/reproduce") / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BTSError(f"unknown reproduction profile '{name_or_path}' (no {path})")
    raw = yaml.safe_load(path.read_text()) or {}
    if "base" in raw:  # a profile may extend another one and override some of its keys
        base_name = raw.pop("base")
        base = yaml.safe_load((path.parent / f"{base_name}.yaml").read_text())
        raw = {**base, **raw}
    known = set(Profile.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BTSError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    stages = []
    for s in raw.get("stages", []):
        bad = sorted(set(s) - set(StageSpec.__dataclass_fields__))
        if bad:
            raise BTSError(f"{path}: stage {s.get('name')}: unknown key '{bad[0]}'")
        stages.append(StageSpec(**s))
    raw["stages"] = stages
    for stage in stages:  # a typo in a task name fails here, not after the stage has trained
        if stage.extra_eval_tasks:
            from bts.eval.suite import resolve_tasks

            try:
                resolve_tasks(stage.extra_eval_tasks)
            except BTSError as e:
                raise BTSError(f"{path}: stage {stage.name}: extra_eval_tasks: {e}") from None
    return Profile(**raw)


class Pipeline:
    def __init__(self, profile: Profile, seed: int, force: list[str] | None = None, progress: bool = True,
                 allow_changed_models: bool = False):
        self.p = profile
        self.allow_changed_models = allow_changed_models
        self.seed = seed
        self.runs = Path(profile.runs_dir if seed == 0 else f"{profile.runs_dir}/seed_{seed}")
        self.state_dir = self.runs / ".stages"
        self.force = set(force or [])
        self.progress = progress
        self.hashes: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    # --- bookkeeping -----------------------------------------------------------------------------------------
    def _record(self, name: str) -> dict | None:
        f = self.state_dir / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def _done(self, name: str, h: str, output: Path | None) -> bool:
        rec = self._record(name)
        ok = rec is not None and rec.get("hash") == h and rec.get("status") == "done"
        return ok and (output is None or output.exists()) and name not in self.force

    def _mark(self, name: str, h: str, status: str, **extra) -> None:
        atomic_write_json(self.state_dir / f"{name}.json", {"hash": h, "status": status, **extra})

    def log(self, msg: str) -> None:
        print(f"[reproduce:{self.p.profile}:seed{self.seed}] {msg}", flush=True)

    # --- stages ------------------------------------------------------------------------------------------------
    def run_data(self) -> None:
        from bts.data import ensure_built

        t = time.perf_counter()
        ensure_built()
        self.timings["data"] = time.perf_counter() - t

    def tokenizer_dir(self) -> Path:
        return self.runs / "tokenizer"

    def run_tokenizer(self) -> None:
        from bts.data.tokenizer import train_tokenizer

        if self.p.tokenizer_stage:
            return self._tokenizer_of_stage(self.p.tokenizer_stage)
        if self.p.tokenizer_from:  # the tokenizer of a committed checkpoint, verified against its SHA256SUMS
            from bts.dense import pinned

            h = config_hash({"pinned": pinned.verify(self.p.tokenizer_from)})
        else:
            h = config_hash({"vocab": self.p.tokenizer_vocab_size})
        self.hashes["tokenizer"] = h
        out = self.tokenizer_dir()
        if self._done("tokenizer", h, out):
            self.log("tokenizer: reused")
            return
        t = time.perf_counter()
        if self.p.tokenizer_from:
            from bts.dense import pinned

            self.log(f"tokenizer: from the pinned checkpoint {self.p.tokenizer_from} (sha256 verified)")
            pinned.install(self.p.tokenizer_from, None, out)
            self.timings["tokenizer"] = time.perf_counter() - t
            self._mark("tokenizer", h, "done")
            return
        self.log(f"tokenizer: training BPE (vocab {self.p.tokenizer_vocab_size})")
        train_tokenizer(out, vocab_size=self.p.tokenizer_vocab_size)
        self.timings["tokenizer"] = time.perf_counter() - t
        self._mark("tokenizer", h, "done")

    def _tokenizer_of_stage(self, name: str) -> None:
        """Run stage ``name`` ahead of the others and copy its output's tokenizer files to ``<runs>/tokenizer``."""
        from bts.core.io import atomic_dir, copy_tokenizer_files

        stage = next((s for s in self.p.stages if s.name == name), None)
        if stage is None or stage.after:
            raise BTSError(f"profile {self.p.profile}: tokenizer_stage '{name}' must name a stage without 'after'")
        prep = self.prepare(stage)
        output = self.run_stage(stage, prep, evaluate=False)
        h = config_hash({"stage": prep.hash})
        self.hashes["tokenizer"] = h
        out = self.tokenizer_dir()
        if self._done("tokenizer", h, out):
            self.log("tokenizer: reused")
            return
        with atomic_dir(out) as tmp:
            if "tokenizer.json" not in copy_tokenizer_files(output, tmp):
                raise BTSError(f"stage {name} wrote no tokenizer.json into {output}")
        self.log(f"tokenizer: from stage {name} ({output})")
        self._mark("tokenizer", h, "done")

    def resolve_config(self, stage: StageSpec) -> Path:
        """Copy the stage config with the run root rewritten to this run's directory (as ``bts fit --run_dir``)."""
        from bts.cli.run_dir import relocate_text

        text = relocate_text(Path(stage.config).read_text(), self.runs, root=DEFAULT_RUN_ROOT)
        out = self.runs / "configs" / f"{stage.name}.yaml"
        atomic_write_text(out, text)
        return out

    def _fit_args(self, stage: StageSpec, cfg_path: Path) -> tuple[list[str], dict]:
        cfg = yaml.safe_load(cfg_path.read_text())
        cls = cfg["model"]["class_path"].rsplit(".", 1)[-1]
        args = ["fit", "--config", str(cfg_path), f"--seed_everything={self.seed}"] + self._seed_overrides(cfg)
        args += list(self.p.fit_overrides) + list(self.p.model_overrides.get(cls, [])) + list(stage.args)
        return args, cfg

    def _seed_overrides(self, cfg: dict) -> list[str]:
        """For seed ``s > 0``: every integer ``seed`` / ``*_seed`` init argument of the model and the data module
        (the config's value, else the class's default) is shifted by ``s``. ``seed_everything`` alone would not vary
        a run: the weight init, the routers' init and the data order have their own seeds. Shifting defaults too
        keeps a module's and a data module's ``seed`` equal (Lightning refuses to merge differing hparams). Seed 0
        keeps the configs exactly as written."""
        if self.seed == 0:
            return []
        out = []
        for section in ("model", "data"):
            node = cfg.get(section) or {}
            seeds = _seed_params(node.get("class_path"))
            seeds.update({k: v for k, v in (node.get("init_args") or {}).items() if _is_seed(k, v)})
            out += [f"--{section}.init_args.{k}={v + self.seed}" for k, v in seeds.items()]
        return out

    def prepare_fit(self, stage: StageSpec) -> Prepared:
        cfg_path = self.resolve_config(stage)
        args, cfg = self._fit_args(stage, cfg_path)
        output = Path(cfg["model"]["init_args"]["output_dir"])
        h = config_hash({"cfg": cfg_path.read_text(), "args": args, "deps": [self.hashes[d] for d in stage.after],
                         "tok": self.hashes.get("tokenizer")})
        return Prepared(h, output, args, self._ckpt_dir(cfg))

    def run_fit(self, stage: StageSpec, prep: Prepared | None = None) -> Path:
        from bts.cli.lightning import mark_resuming, run_lightning

        prep = prep or self.prepare(stage)
        h, output, args, ckpt_dir = prep.hash, prep.output, list(prep.args), prep.ckpt_dir
        if self._done(stage.name, h, output):
            self.log(f"{stage.name}: reused ({output})")
            return output
        rec = self._record(stage.name)
        resume = None
        # --force means a fresh run: never resume it from its (possibly finished) last checkpoint
        forced = stage.name in self.force
        if not forced and rec and rec.get("hash") == h and ckpt_dir and (ckpt_dir / "last.ckpt").is_file():
            resume = ckpt_dir / "last.ckpt"
            try:
                check_lightning_checkpoint(resume)
                self.log(f"{stage.name}: resuming from {resume}")
            except BTSError as e:
                self.log(f"{stage.name}: cannot resume ({e}); restarting the stage")
                resume = None
        if resume is None and ckpt_dir and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        self._mark(stage.name, h, "started")
        # not part of the stage hash (a display setting): stages report progress as lines (bts.training.progress), which
        # read well in a console and in the stage logs of a parallel run, where a bar would not
        args.append("--trainer.enable_progress_bar=false")
        self.log(f"{stage.name}: bts {' '.join(args)}")
        t = time.perf_counter()
        cli = run_lightning(args[1:], run=False)
        # a log dir without a versioned logger may hold the interrupted/earlier run's config.yaml: keep it, and save
        # this run's beside it
        mark_resuming(cli.trainer, "resumed" if resume else "rerun")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(resume) if resume else None,
                        weights_only=True)
        self.timings[stage.name] = time.perf_counter() - t
        if not output.exists():
            raise BTSError(f"stage {stage.name} finished without writing {output}")
        self._mark(stage.name, h, "done", seconds=round(self.timings[stage.name], 1))
        if not self.p.keep_checkpoints and ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return output

    @staticmethod
    def _ckpt_dir(cfg: dict) -> Path | None:
        for cb in (cfg.get("trainer") or {}).get("callbacks") or []:
            if cb.get("class_path", "").endswith("ModelCheckpoint"):
                d = cb.get("init_args", {}).get("dirpath")
                return Path(d) if d else None
        return None

    def prepare_command(self, stage: StageSpec) -> Prepared:
        """A project subcommand stage: ``bts <args...>`` (``{runs}`` in args is this run's directory), with
        ``--config <resolved copy>`` appended when the stage names a config. The output is ``--out`` or the
        config's ``out`` key."""
        args = [a.replace("{runs}", self.runs.as_posix()) for a in stage.args]
        args += [str(a) for a in self.p.command_overrides.get(args[0], [])] if args else []
        cfg_text = ""
        output = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if stage.config:
            cfg_path = self.resolve_config(stage)
            cfg_text = cfg_path.read_text()
            args += ["--config", str(cfg_path)]
            output = output or Path(yaml.safe_load(cfg_text)["out"])
        h = config_hash({"args": args, "cfg": cfg_text, "deps": [self.hashes[d] for d in stage.after]})
        return Prepared(h, output, args)

    def run_command(self, stage: StageSpec, prep: Prepared | None = None) -> Path:
        from bts.cli.main import main as bts_main

        prep = prep or self.prepare(stage)
        if self._done(stage.name, prep.hash, prep.output):
            self.log(f"{stage.name}: reused")
            return prep.output
        self.log(f"{stage.name}: bts {' '.join(prep.args)}")
        t = time.perf_counter()
        rc = bts_main(list(prep.args))
        if rc != 0:
            raise BTSError(f"stage {stage.name} failed (exit {rc})")
        self.timings[stage.name] = time.perf_counter() - t
        self._mark(stage.name, prep.hash, "done", seconds=round(self.timings[stage.name], 1))
        return prep.output

    def run_pretrained(self, stage: StageSpec, prep: Prepared) -> Path:
        """A committed checkpoint (``stage.path``), verified against its SHA256SUMS and copied to ``<runs>/<name>``."""
        from bts.dense import pinned

        if self._done(stage.name, prep.hash, prep.output):
            self.log(f"{stage.name}: reused ({prep.output})")
            return prep.output
        self.log(f"{stage.name}: from the pinned checkpoint {stage.path} (sha256 verified)")
        pinned.install(stage.path, prep.output)
        self._mark(stage.name, prep.hash, "done", pinned=stage.path)
        return prep.output

    def export(self) -> None:
        """Publish ``export.stage``'s model and the tokenizer as a pinned checkpoint (``export.to``)."""
        from bts.dense import pinned
        from bts.pipeline.export import first_steps_fingerprint

        spec = self.p.export or {}
        if set(spec) != {"stage", "to"}:
            raise BTSError(f"profile {self.p.profile}: export needs exactly the keys 'stage' and 'to'")
        command = f"bts reproduce --profile {self.p.profile}"
        stage = next(s for s in self.p.stages if s.name == spec["stage"])
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:  # pinned beside the weights; tests/test_pinned.py recomputes it
            first = first_steps_fingerprint(stage.config, self.tokenizer_dir(), Path(tmp))
        digest = pinned.publish(self.runs / spec["stage"], self.tokenizer_dir(), Path(spec["to"]), command,
                                note=f"Made by `{command}` from `{self.runs / spec['stage']}` (git commit "
                                     f"{_git_commit()}).", config=self.runs / "configs" / f"{spec['stage']}.yaml",
                                first_steps=first)
        self.log(f"published {spec['to']} (SHA256SUMS digest {digest})")

    def write_val_tokens(self) -> None:
        """Token blocks of the BTS validation mixture (``<runs>/val_tokens.npy``), used to choose merge λ."""
        import numpy as np

        from bts.data import DomainMixDataModule

        out = self.runs / "val_tokens.npy"
        h = config_hash({"tok": self.hashes.get("tokenizer"), "n": self.p.val_tokens_per_domain})
        self.hashes["val_tokens"] = h
        if self._done("val_tokens", h, out):
            return
        dm = DomainMixDataModule(tokenizer_dir=str(self.tokenizer_dir()), mixture="bts",
                                 val_blocks_per_domain=self.p.val_tokens_per_domain)
        dm.setup("validate")
        blocks = [b["input_ids"] for loader in dm.val_dataloader() for b in loader]
        import torch

        from bts.core.io import atomic_path

        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, torch.cat(blocks).numpy())
        self._mark("val_tokens", h, "done")

    # --- evaluation --------------------------------------------------------------------------------------------
    def evaluate_stage(self, stage: StageSpec, output: Path) -> dict:
        from bts.eval.loading import changed_models_entry, load_for_eval
        from bts.eval.suite import TASKS, EvalConfig, evaluate

        unknown = sorted(set(self.p.eval) - set(EvalConfig.__dataclass_fields__))
        if unknown:
            raise BTSError(f"profile {self.p.profile}: unknown eval key '{unknown[0]}'")
        cfg = EvalConfig(**self.p.eval)
        # the suite's task list and full config are part of the key: a new metric re-evaluates every method
        key = {"stage": self.hashes[stage.name], "eval": asdict(cfg), "tasks": sorted(TASKS),
               "eval_tasks": self._eval_tasks(stage)}
        if self.allow_changed_models:
            key["allow_changed_models"] = True
        device = None
        if self.p.eval_device:
            from bts.dense.modeling import resolve_device

            device = resolve_device(self.p.eval_device)
            key["device"] = device.type
        h = config_hash(key)
        cache = output / "eval.json"
        if cache.is_file():
            rec = json.loads(cache.read_text())
            if rec.get("hash") == h and stage.name not in self.force:
                return rec["result"]
        t = time.perf_counter()
        import torch

        model, tokenizer, params = load_for_eval(output, allow_changed_models=self.allow_changed_models)
        if device is not None:
            model = model.to(device)
        threads = torch.get_num_threads()
        if self.p.eval_threads:
            torch.set_num_threads(self.p.eval_threads)
        try:
            tasks = self._eval_tasks(stage)
            kw = {"tasks": tasks} if tasks is not None else {}
            result = evaluate(model, tokenizer, cfg=cfg, progress=self.progress, **kw)
        finally:
            torch.set_num_threads(threads)
        result = {"family": stage.family, "params": params, **result, **changed_models_entry(model)}
        atomic_write_json(cache, {"hash": h, "result": result})
        self.timings[f"eval_{stage.name}"] = time.perf_counter() - t
        return result

    def _eval_tasks(self, stage: StageSpec) -> list[str] | None:
        if stage.report == "ablation" and self.p.ablation_eval_tasks is not None:
            base = list(self.p.ablation_eval_tasks)
        else:
            base = None if self.p.eval_tasks is None else list(self.p.eval_tasks)
        if not stage.extra_eval_tasks:
            return base
        from bts.eval.suite import DEFAULT_TASKS

        return [*(DEFAULT_TASKS if base is None else base), *stage.extra_eval_tasks]

    def prepare(self, stage: StageSpec) -> Prepared:
        """Resolve a stage's config and compute its hash (cheap; no training)."""
        missing = [d for d in stage.after if d not in self.hashes]
        if missing:
            raise BTSError(f"stage {stage.name} runs after unknown stage(s): {', '.join(missing)}")
        if stage.kind == "fit":
            prep = self.prepare_fit(stage)
        elif stage.kind == "command":
            prep = self.prepare_command(stage)
        elif stage.kind == "pretrained":
            from bts.dense import pinned

            if not stage.path:
                raise BTSError(f"stage {stage.name}: kind 'pretrained' needs a 'path'")
            prep = Prepared(config_hash({"pinned": pinned.verify(stage.path)}), self.runs / stage.name, [])
        else:
            raise BTSError(f"stage {stage.name}: unknown kind '{stage.kind}' (fit, command, pretrained)")
        self.hashes[stage.name] = prep.hash
        return prep

    def run_stage(self, stage: StageSpec, prep: Prepared, evaluate: bool = True):
        """Train/build one stage (or reuse it) and evaluate it; returns its metrics entry (None: not reported), or
        with ``evaluate=False`` its output directory."""
        if stage.kind == "pretrained":
            output = self.run_pretrained(stage, prep)
        else:
            output = self.run_fit(stage, prep) if stage.kind == "fit" else self.run_command(stage, prep)
        if not evaluate:
            return output
        if (stage.report or "method") == "none":
            return None
        self.log(f"{stage.name}: evaluating")
        return self.evaluate_stage(stage, output)

    def run(self, jobs: int = 1) -> dict:
        """Every stage in dependency order; with ``jobs > 1`` up to ``jobs`` independent stages at a time, each in
        its own worker process with ``cpu_count // jobs`` torch threads (an ``exclusive`` stage: alone, with every
        core) and its output in ``<runs>/logs/reproduce/<stage>.log``. The tiny models use two threads poorly:
        two one-thread stages at a time finish the tiny profile 1.46x sooner on two cores. Every stage is seeded
        on its own, so the order of execution does not change a result."""
        ensure_writable_dir(self.runs)
        t0 = time.perf_counter()
        self.log("data: building / checking the embedded corpus")
        self.run_data()
        self.run_tokenizer()
        self.write_val_tokens()
        preps = {stage.name: self.prepare(stage) for stage in self.p.stages}
        results: dict[str, dict | None] = {}
        if jobs <= 1:
            for stage in self.p.stages:
                results[stage.name] = self.run_stage(stage, preps[stage.name])
        else:
            results = self._run_parallel(preps, jobs)
        if self.p.export and self.seed == 0:
            self.export()
        methods, ablations = {}, {}
        for stage in self.p.stages:
            if results.get(stage.name) is not None:
                (ablations if stage.report == "ablation" else methods)[stage.name] = results[stage.name]
        return {"methods": methods, "ablations": ablations, "timings": self.timings,
                "wall_seconds": time.perf_counter() - t0}

    def _run_parallel(self, preps: dict[str, Prepared], jobs: int) -> dict[str, dict | None]:
        import multiprocessing as mp
        import os
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        cores = os.cpu_count() or 1
        log_dir = self.runs / "logs" / "reproduce"
        log_dir.mkdir(parents=True, exist_ok=True)
        pending = list(self.p.stages)
        results: dict[str, dict | None] = {}
        running: dict = {}
        failure: BaseException | None = None
        total = len(pending)
        # spawn: a forked copy of a process that already ran torch/Lightning is not safe to train in
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=_die_with_parent) as pool:
            while (pending and failure is None) or running:
                ready = [s for s in pending if all(d in results for d in s.after)] if failure is None else []
                for stage in ready:
                    busy = [s for s, _, _ in running.values()]
                    if len(busy) >= jobs or any(s.exclusive for s in busy) or (stage.exclusive and busy):
                        break
                    # a fixed thread count per stage (not "whatever is free now") keeps results independent of timing
                    threads = cores if stage.exclusive else max(1, cores // jobs)
                    pending.remove(stage)
                    log = log_dir / f"{stage.name}.log"
                    self.log(f"{stage.name}: started (log: {log})")
                    fut = pool.submit(_stage_worker, self.p, self.seed, sorted(self.force), self.allow_changed_models,
                                      self.progress, dict(self.hashes), stage.name, preps[stage.name], threads,
                                      str(log))
                    running[fut] = (stage, time.perf_counter(), log)
                if not running:  # cannot happen with stages in dependency order (prepare() checks it)
                    raise BTSError(f"no stage can start: {', '.join(s.name for s in pending)}")
                done, _ = wait(running, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
                if not done:  # a heartbeat: what runs, for how long, and its last progress line
                    now = time.perf_counter()
                    self.log("running: " + "; ".join(
                        f"{s.name} {now - started:.0f} s" + (f" ({line})" if (line := _last_progress(log)) else "")
                        for s, started, log in running.values()))
                for fut in done:
                    stage, started, log = running.pop(fut)
                    try:
                        results[stage.name], timings = fut.result()
                    except BaseException as e:  # noqa: BLE001 - reported below with the stage's log
                        failure = failure or e
                        self.log(f"{stage.name}: FAILED after {time.perf_counter() - started:.0f} s: {e}\n"
                                 f"  last lines of {log}:\n" + _tail(log))
                        continue
                    self.timings.update(timings)
                    self.log(f"{stage.name}: done in {time.perf_counter() - started:.0f} s "
                             f"({len(results)}/{total} stages)")
        if failure is not None:
            raise failure if isinstance(failure, BTSError) else BTSError(f"a stage failed: {failure}")
        return results


@dataclass(frozen=True)
class Prepared:
    """A stage resolved for running: its hash, output path, argv and checkpoint directory."""

    hash: str
    output: Path | None
    args: list[str]
    ckpt_dir: Path | None = None


def _is_seed(name: str, value) -> bool:
    return (name == "seed" or name.endswith("_seed")) and isinstance(value, int) and not isinstance(value, bool)


def _seed_params(class_path: str | None) -> dict[str, int]:
    """``{name: default}`` of the integer seed parameters of ``class_path.__init__`` (empty if it cannot import)."""
    import importlib
    import inspect

    if not class_path or "." not in class_path:
        return {}
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return {}  # the Lightning CLI reports a bad class_path itself, with a better message
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if _is_seed(p.name, p.default)}


HEARTBEAT_S = 60.0
"""Seconds between the heartbeat lines of a parallel run (each running stage and its last progress line)."""


def _last_progress(log: Path) -> str | None:
    """The last ``bts.training.progress`` line of a stage log, without its ``[name]`` prefix (None: none yet)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    hit = next((ln for ln in reversed(lines) if "] step " in ln), None)
    return hit.split("] ", 1)[1].strip() if hit else None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join("    " + ln for ln in Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "    (no log)"


def _die_with_parent() -> None:
    """Worker initializer: on Linux, the kernel kills the worker when the pipeline process dies (e.g. SIGKILL), so an
    orphaned stage never keeps writing into a run directory whose lock is already released."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def _stage_worker(profile: Profile, seed: int, force: list[str], allow_changed_models: bool, progress: bool,
                  hashes: dict, name: str, prep: Prepared, threads: int, log: str) -> tuple[dict | None, dict]:
    """Run one stage in a worker process of ``Pipeline._run_parallel``; its stdout/stderr (progress bars included:
    ``tail -f`` the log to follow a stage) go to ``log``."""
    import os

    import torch

    torch.set_num_threads(threads)
    pipe = Pipeline(profile, seed, force, progress=progress, allow_changed_models=allow_changed_models)
    pipe.hashes = hashes
    stage = next(s for s in profile.stages if s.name == name)
    # redirect the file descriptors, not sys.stdout: Lightning's logging handlers and C-level output write to them
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        result = pipe.run_stage(stage, prep)
    except BaseException:
        import traceback

        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
    return result, pipe.timings


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def aggregate_seeds(per_seed: list[dict]) -> dict:
    """Mean over seeds of every float; a sibling '<key>_std' holds the standard deviation (docs/design.md §6)."""
    if len(per_seed) == 1:
        return per_seed[0]

    def agg(values):
        first = values[0]
        if isinstance(first, dict):
            out = {}
            for k in first:
                vals = [v[k] for v in values if k in v]
                out[k] = agg(vals)
                if isinstance(first[k], float):
                    mean = sum(vals) / len(vals)
                    out[f"{k}_std"] = math.sqrt(sum((x - mean) ** 2 for x in vals) / max(1, len(vals) - 1))
            return out
        if isinstance(first, float):
            return sum(values) / len(values)
        return first

    return agg(per_seed)


def model_config_summary(runs: Path) -> dict:
    cfg = json.loads((runs / "seed" / "config.json").read_text())
    summary = {"d_model": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"]}
    bts_manifest = runs / "bts" / "bts.json"
    if bts_manifest.is_file():
        m = json.loads(bts_manifest.read_text())
        summary |= {"n_experts": m["n_experts"], "stitch_layers": m["stitch_config"]["num_stitch_layers"],
                    "stitch_init": m["stitch_config"]["init"]}
    return summary


def write_figures(profile: Profile, results_dir: Path, threads: int | None) -> dict | None:
    """Loss curves of every trained stage and the gate analysis of the BTS model (seed 0's run); returns gates.json.
    The figures of the metrics themselves come later, from metrics.json (``bts.pipeline.figures_results``)."""
    import torch

    from bts.pipeline.figures import write_loss_figures

    runs = Path(profile.runs_dir)
    write_loss_figures(runs / "logs", [s.name for s in profile.stages if s.kind == "fit"], results_dir / "figures")
    if not (runs / "bts" / "bts.json").is_file():
        return None
    from bts.stitch.gates.analysis import analyze

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return analyze(runs / "bts", runs / "tokenizer", results_dir, tb_log_dir=runs / "logs" / "gates")
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="bts reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny", help="configs/reproduce/<profile>.yaml or a path (default: tiny)")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds; with >1 floats are mean with *_std")
    ap.add_argument("--force", nargs="*", default=[], help="stage names to rerun even if reusable")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--jobs", type=int, default=None,
                    help="independent stages run at a time, each in its own process with cpu_count/jobs torch "
                    "threads (default: the profile's `jobs`)")
    ap.add_argument("--force-results", action="store_true",
                    help="write into a results_dir that holds metrics.json of another profile")
    ap.add_argument("--allow-changed-models", action="store_true",
                    help="evaluate stitch checkpoints whose frozen models changed (recorded as changed_models)")
    ap.add_argument("--bundle", metavar="DIR",
                    help="an offline bundle (bts bundle): verified, then used instead of the network; as $BTS_BUNDLE")
    args = ap.parse_args(argv)
    if args.bundle:  # before any check or stage: a missing or corrupt file is one error line
        from bts.offline.node import activate

        activate(args.bundle)
    if args.seeds < 1:
        raise BTSError(f"--seeds must be >= 1 (got {args.seeds})")
    if args.jobs is not None and args.jobs < 1:
        raise BTSError(f"--jobs must be >= 1 (got {args.jobs})")
    profile = load_profile(args.profile)
    known = ["tokenizer", *(s.name for s in profile.stages)]
    if set(args.force) - set(known):
        raise BTSError(f"--force: unknown stage {min(set(args.force) - set(known))!r} (stages of profile "
                       f"{profile.profile}: {', '.join(known)})")
    check_accelerator(profile)
    results_dir = ensure_writable_dir(profile.results_dir)
    ensure_writable_dir(profile.runs_dir)
    with exclusive_lock(Path(profile.runs_dir) / ".lock", f"run directory {profile.runs_dir}"):
        if not args.force_results:
            check_results_dir(results_dir, profile.profile)
        return _reproduce(profile, results_dir, args)


def check_accelerator(profile: Profile) -> None:
    """A profile written for a GPU (``--trainer.accelerator=gpu``) on a machine without one: refuse it before any
    stage runs, and say what to run instead."""
    import torch

    wants_gpu = any(o.replace(" ", "=") in ("--trainer.accelerator=gpu", "--trainer.accelerator=cuda")
                    for o in profile.fit_overrides)
    if wants_gpu and not torch.cuda.is_available():
        smoke = Path("configs/reproduce") / f"{profile.profile}_smoke.yaml"
        hint = f"run --profile {smoke.stem} on CPU" if smoke.is_file() else "run it on a machine with a GPU"
        raise BTSError(f"profile {profile.profile} trains on a GPU (--trainer.accelerator=gpu) and this machine has "
                       f"none; {hint}")


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


def _reproduce(profile: Profile, results_dir: Path, args) -> int:
    from bts.pipeline import summary

    t0 = time.perf_counter()
    per_seed, per_seed_items, per_seed_gates, runs_dirs, timings = [], [], [], [], {}
    jobs = getattr(args, "jobs", None) or profile.jobs
    for s in range(args.seeds):
        pipe = Pipeline(profile, s, args.force, progress=not args.no_progress,
                        allow_changed_models=getattr(args, "allow_changed_models", False))
        out = pipe.run(jobs)
        runs_dirs.append(pipe.runs)
        entries, items = {}, {}
        for kind in ("methods", "ablations"):
            entries[kind] = {}
            for name, entry in out[kind].items():
                entries[kind][name], items[name] = summary.split_items(entry)
        per_seed.append(entries)
        per_seed_items.append(items)
        timings[f"seed{s}"] = {k: round(v, 1) for k, v in out["timings"].items()}
        # the gate analysis of every seed's BTS feeds the gate claims; seed 0's also writes the figures
        per_seed_gates.append(write_figures(profile, results_dir, profile.eval_threads) if s == 0
                              else gate_summary(pipe.runs, profile.eval_threads))
    chance = {}
    for entries in per_seed:
        for e in entries["methods"].values():
            chance.update(e.pop("chance", {}) or {})
        for e in entries["ablations"].values():
            e.pop("chance", None)
    merged = aggregate_seeds(per_seed)
    for kind in ("methods", "ablations"):
        summary.add_cell_cis(merged[kind], per_seed_items)
    no_signal = summary.no_signal(merged["methods"], chance)
    tasks = sorted({t for e in merged["methods"].values() for t in e.get("tasks", {}) if not t.endswith("_std")})
    # the average (and the claims on it) covers the tasks with signal that every method was scored on
    signal = [t for t in tasks if t not in no_signal
              and all(t in e.get("tasks", {}) for e in merged["methods"].values())]
    for entries in per_seed:  # avg over the tasks with signal, per seed, then mean ± std like every other float
        for kind in ("methods", "ablations"):
            for e in entries[kind].values():
                summary.set_avg(e, signal)
    avg = aggregate_seeds(per_seed)
    for kind in ("methods", "ablations"):
        for name, e in merged[kind].items():
            e["avg"] = avg[kind][name].get("avg")
            if "avg_std" in avg[kind][name]:
                e["avg_std"] = avg[kind][name]["avg_std"]
    from bts.pipeline.claims import check_claims
    from bts.pipeline.report import write_results

    config = {**model_config_summary(Path(profile.runs_dir)), "domains": list(DOMAINS)}
    metrics = {
        "profile": profile.profile,
        "seeds": list(range(args.seeds)),
        "git_commit": _git_commit(),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
        "config": config,
        "regime": summary.regime(runs_dirs, merged["methods"]),
        "chance": {t: chance[t] for t in tasks if t in chance},
        "no_signal_tasks": no_signal,
        "methods": merged["methods"],
        "ablations": merged["ablations"],
        "claims": check_claims(per_seed_items, signal, per_seed_gates),
        "env": _env(runs_dirs[0], merged),
        "stage_seconds": timings,
    }
    if getattr(args, "allow_changed_models", False):
        metrics["allow_changed_models"] = True
    from bts.pipeline.figures_results import write_metrics_figures

    write_metrics_figures(metrics, results_dir)  # before the README, which shows them
    write_results(results_dir, metrics, per_seed_gates[0])
    print(f"wrote {results_dir}/metrics.json and tables in {metrics['wall_seconds']:.0f} s")
    return 0


def gate_summary(runs: Path, threads: int | None) -> dict | None:
    """The gate analysis of ``runs/bts`` (no figures kept), for the gate claims of seeds after the first."""
    import tempfile

    import torch

    from bts.stitch.gates.analysis import analyze

    if not (Path(runs) / "bts" / "bts.json").is_file():
        return None
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return analyze(Path(runs) / "bts", Path(runs) / "tokenizer", tmp)
    finally:
        torch.set_num_threads(before)


def _env(runs: Path, merged: dict) -> dict | None:
    """The ``env`` block: package versions, machine, matmul peak, hashes of data, tokenizer and models."""
    try:
        from bts.pipeline.env import collect_env
    except ImportError:
        return None
    names = [*merged["methods"], *merged["ablations"]]
    models = {n: runs / n for n in names if (runs / n).is_dir()}
    return collect_env(models=models, tokenizer_dir=runs / "tokenizer")


if __name__ == "__main__":
    sys.exit(main())
