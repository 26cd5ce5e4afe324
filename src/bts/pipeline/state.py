"""The bookkeeping of one seed's run of a profile: its directory, a record per stage (``<runs>/.stages/<name>.json``:
the stage's hash and status), the stages' hashes and timings, and its log lines.

A stage is reused when its record says ``done`` with the same hash and its output exists (docs/design.md §6). The
stage kinds (``bts.pipeline.stages``) read and write these records; ``bts.pipeline.run.Pipeline`` extends this class
with the order in which stages run and their evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from bts.cli.run_dir import relocate_text
from bts.core.io import atomic_write_json, atomic_write_text
from bts.pipeline.profile import DEFAULT_RUN_ROOT, Profile, StageSpec


class RunState:
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

    def tokenizer_dir(self) -> Path:
        return self.runs / "tokenizer"

    def resolve_config(self, stage: StageSpec) -> Path:
        """Copy the stage config with the run root rewritten to this run's directory (as ``bts fit --run_dir``)."""
        text = relocate_text(Path(stage.config).read_text(), self.runs, root=DEFAULT_RUN_ROOT)
        out = self.runs / "configs" / f"{stage.name}.yaml"
        atomic_write_text(out, text)
        return out
