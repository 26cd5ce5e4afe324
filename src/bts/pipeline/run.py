"""One seed's run of a profile (``Pipeline``): data, tokenizer, the stages in dependency order (one at a time, or as a
task graph over worker processes), the evaluation of every reported stage, and the profile's export.

Stage outputs, records and logs live under ``runs_dir`` (``runs_dir/seed_<s>`` for seed ``s > 0``); what a stage
kind does is ``bts.pipeline.stages``, the worker pool ``bts.pipeline.scheduler``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bts.core.io import (
    BTSError,
    atomic_dir,
    atomic_path,
    atomic_write_json,
    config_hash,
    copy_tokenizer_files,
    ensure_writable_dir,
)
from bts.data import ensure_built
from bts.data.tokenizer import train_tokenizer
from bts.dense import pinned
from bts.pipeline.env import git_commit
from bts.pipeline.profile import Profile, StageSpec
from bts.pipeline.scheduler import Task, run_graph
from bts.pipeline.stages import STAGE_KINDS, Prepared
from bts.pipeline.state import RunState


class Pipeline(RunState):
    # --- before the stages -------------------------------------------------------------------------------------
    def run_data(self) -> None:
        t = time.perf_counter()
        ensure_built()
        self.timings["data"] = time.perf_counter() - t

    def run_tokenizer(self) -> None:
        if self.p.tokenizer_stage:
            return self._tokenizer_of_stage(self.p.tokenizer_stage)
        if self.p.tokenizer_from:  # the tokenizer of a committed checkpoint, verified against its SHA256SUMS
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

    def write_val_tokens(self) -> None:
        """Token blocks of the BTS validation mixture (``<runs>/val_tokens.npy``), used to choose merge λ."""
        out = self.runs / "val_tokens.npy"
        h = config_hash({"tok": self.hashes.get("tokenizer"), "n": self.p.val_tokens_per_domain})
        self.hashes["val_tokens"] = h
        if self._done("val_tokens", h, out):
            return
        # numpy, torch and (under the data module) lightning: heavy, and not needed by `bts reproduce --help`
        import numpy as np
        import torch

        from bts.data import DomainMixDataModule

        dm = DomainMixDataModule(tokenizer_dir=str(self.tokenizer_dir()), mixture="bts",
                                 val_blocks_per_domain=self.p.val_tokens_per_domain)
        dm.setup("validate")
        blocks = [b["input_ids"] for loader in dm.val_dataloader() for b in loader]
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, torch.cat(blocks).numpy())
        self._mark("val_tokens", h, "done")

    # --- stages ------------------------------------------------------------------------------------------------
    def prepare(self, stage: StageSpec) -> Prepared:
        """Resolve a stage's config and compute its hash (cheap; no training)."""
        missing = [d for d in stage.after if d not in self.hashes]
        if missing:
            raise BTSError(f"stage {stage.name} runs after unknown stage(s): {', '.join(missing)}")
        kind = STAGE_KINDS.get(stage.kind)
        if kind is None:
            raise BTSError(f"stage {stage.name}: unknown kind '{stage.kind}' ({', '.join(STAGE_KINDS)})")
        prep = kind.prepare(self, stage)
        self.hashes[stage.name] = prep.hash
        return prep

    def run_stage(self, stage: StageSpec, prep: Prepared, evaluate: bool = True):
        """Train/build one stage (or reuse it) and evaluate it; returns its metrics entry (None: not reported), or
        with ``evaluate=False`` its output directory."""
        output = STAGE_KINDS[stage.kind].run(self, stage, prep)
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
        """The stages as a task graph (``bts.pipeline.scheduler``), each run by ``_stage_worker``."""
        setup = (self.p, self.seed, sorted(self.force), self.allow_changed_models, self.progress, dict(self.hashes))
        tasks = [Task(s.name, _stage_worker, (*setup, s.name, preps[s.name]), tuple(s.after), s.exclusive)
                 for s in self.p.stages]
        results: dict[str, dict | None] = {}
        for name, (result, timings) in run_graph(tasks, jobs, self.runs / "logs" / "reproduce", self.log).items():
            results[name] = result
            self.timings.update(timings)
        return results

    # --- evaluation --------------------------------------------------------------------------------------------
    def evaluate_stage(self, stage: StageSpec, output: Path) -> dict:
        # torch and the task modules (heavy): imported when a stage is evaluated
        from bts.eval.loading import changed_models_entry, load_for_eval
        from bts.eval.suite import TASKS, evaluate

        cfg = self.p.eval
        # the suite's task list and full config are part of the key: a new metric re-evaluates every method
        key = {"stage": self.hashes[stage.name], "eval": asdict(cfg), "tasks": sorted(TASKS),
               "eval_tasks": self._eval_tasks(stage)}
        if self.allow_changed_models:
            key["allow_changed_models"] = True
        device = None
        if self.p.eval_device:
            from bts.dense.modeling import resolve_device  # transformers

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
        from bts.eval.suite import DEFAULT_TASKS  # torch

        return [*(DEFAULT_TASKS if base is None else base), *stage.extra_eval_tasks]

    # --- after the stages --------------------------------------------------------------------------------------
    def export(self) -> None:
        """Publish ``export.stage``'s model and the tokenizer as a pinned checkpoint (``export.to``)."""
        from bts.pipeline.export import first_steps_fingerprint  # torch and lightning

        spec = self.p.export or {}
        if set(spec) != {"stage", "to"}:
            raise BTSError(f"profile {self.p.profile}: export needs exactly the keys 'stage' and 'to'")
        command = f"bts reproduce --profile {self.p.profile}"
        stage = next(s for s in self.p.stages if s.name == spec["stage"])
        with tempfile.TemporaryDirectory() as tmp:  # pinned beside the weights; tests/test_pinned.py recomputes it
            first = first_steps_fingerprint(stage.config, self.tokenizer_dir(), Path(tmp))
        digest = pinned.publish(self.runs / spec["stage"], self.tokenizer_dir(), Path(spec["to"]), command,
                                note=f"Made by `{command}` from `{self.runs / spec['stage']}` (git commit "
                                     f"{git_commit()}).", config=self.runs / "configs" / f"{spec['stage']}.yaml",
                                first_steps=first)
        self.log(f"published {spec['to']} (SHA256SUMS digest {digest})")


def _stage_worker(profile: Profile, seed: int, force: list[str], allow_changed_models: bool, progress: bool,
                  hashes: dict, name: str, prep: Prepared, *, threads: int) -> tuple[dict | None, dict]:
    """One stage in a worker process of ``Pipeline._run_parallel``: its metrics entry and the timings it took."""
    import torch  # the worker trains and evaluates anyway; the parent need not import torch for it

    torch.set_num_threads(threads)
    pipe = Pipeline(profile, seed, force, progress=progress, allow_changed_models=allow_changed_models)
    pipe.hashes = hashes
    stage = next(s for s in profile.stages if s.name == name)
    return pipe.run_stage(stage, prep), pipe.timings
