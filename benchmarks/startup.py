#!/usr/bin/env python
"""Startup time of the `bts` console script: writes ``benchmarks/STARTUP.md``.

    .venv/bin/python benchmarks/startup.py            # 7 runs per case
    .venv/bin/python benchmarks/startup.py --runs 5
    .venv/bin/python benchmarks/startup.py --runs 5 --pythonpath OTHER/src --out /dev/stdout   # another checkout

Not part of the test suite. Each case is a fresh process (``.venv/bin/bts ...``, wall clock from spawn to exit,
stdout/stderr discarded); the table gives the minimum and the median of the runs (the minimum is the figure
least disturbed by other load on the machine) and the load average when the runs started. Targets (issues 14, 23):
``bts --help`` and ``bts <command> --help`` ≤ 1 s; a config-key error ≤ 3 s on an idle 2-core machine.

Cases:

* ``bts --help``: the command table (no command module imported);
* ``bts <command> --help`` of every project command (the command's light module, jsonargparse) and ``bts fit --help``
  (LightningCLI: imports lightning and torch to build the full help);
* a config-key error: ``bts fit --config configs/bts/tiny.yaml --trainer.max_stepz 3`` (unknown Trainer key, caught
  by ``bts.cli.config_check`` before lightning/torch/the model classes are imported);
* an unknown ``init_args`` key: ``--model.init_args.bogus 1`` (same check, read from the module's source), and a
  nested one, ``--model.init_args.stitch.bogus 1`` (a field of the ``StitchConfig`` dataclass);
* for comparison, a bad value only the full parser sees (``--trainer.max_steps abc``): the cost of importing
  lightning, transformers and the model class before parsing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BTS = str(ROOT / ".venv" / "bin" / "bts") if (ROOT / ".venv" / "bin" / "bts").exists() else None
BTS_CMD = [BTS] if BTS else [sys.executable, "-m", "bts.cli.main"]  # a worktree without its own venv
CONFIG = "configs/bts/tiny.yaml"
COMMAND_NAMES = ("reproduce", "sweep", "eval", "data", "stitch-remove", "merge", "gates", "compare", "ceiling",
                 "import-gguf", "bundle")
CASES = [
    ("bts --help", [BTS, "--help"], 0, 1.0),
    ("bts fit --help (LightningCLI)", [BTS, "fit", "--help"], 0, 1.0),
    *((f"bts {name} --help", [BTS, name, "--help"], 0, 1.0) for name in COMMAND_NAMES),
    ("config-key error (trainer key)", [BTS, "fit", "--config", CONFIG, "--trainer.max_stepz", "3"], 2, 3.0),
    ("config-key error (model init_args key)", [BTS, "fit", "--config", CONFIG, "--model.init_args.bogus", "1"], 2,
     3.0),
    ("config-key error (nested dataclass key)",
     [BTS, "fit", "--config", CONFIG, "--model.init_args.stitch.bogus", "1"], 2, 3.0),
    ("bad value (full parser, for comparison)", [BTS, "fit", "--config", CONFIG, "--trainer.max_steps", "abc"], 2,
     None),
]


def time_once(cmd: list[str], expect_rc: int, env: dict | None = None) -> float:
    cmd = [*BTS_CMD, *cmd[1:]] if cmd[0] == BTS else cmd
    t = time.perf_counter()
    rc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env=env).returncode
    elapsed = time.perf_counter() - t
    if rc != expect_rc:
        sys.exit(f"{' '.join(cmd)} exited {rc}, expected {expect_rc}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "STARTUP.md"))
    ap.add_argument("--pythonpath", help="PYTHONPATH of the measured processes (e.g. another checkout's src)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": args.pythonpath} if args.pythonpath else None
    load = os.getloadavg()[0]
    rows = []
    for name, cmd, rc, target in CASES:
        times = [time_once(cmd, rc, env) for _ in range(args.runs)]
        rows.append((name, min(times), statistics.median(times), target))
        print(f"{name}: min {min(times):.2f} s, median {statistics.median(times):.2f} s", flush=True)
    lines = [
        "# Startup of the `bts` console script",
        "",
        (f"`.venv/bin/python benchmarks/startup.py --runs {args.runs}` ({os.cpu_count()} CPU cores; 1-min load "
         f"average {load:.2f} when the runs started: a load above the core count means the machine was shared and "
         "the figures are upper bounds). Wall clock of a fresh process, spawn to exit."),
        "",
        "| case | min (s) | median (s) | target (s) |",
        "|---|---:|---:|---:|",
        *(f"| {n} | {lo:.2f} | {med:.2f} | {'≤ ' + format(t, '.0f') if t else '—'} |" for n, lo, med, t in rows),
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
