"""``math`` domain: problems from DeepMind's ``mathematics-dataset==1.0.1`` (Apache-2.0), generated offline.

Generation runs in a **subprocess** (``python -m bts.data.sources.math``) because the output is only
deterministic when ``PYTHONHASHSEED=0`` is set before the interpreter starts (the generators iterate over sets of
strings and sympy objects); the child refuses to run without it. Before each module the child seeds ``random``,
numpy's global RNG and sympy's RNG with a seed derived from ``(seed, module name)`` (so adding a module does not
change the problems of the others), and :mod:`.math_compat` patches the package for numpy 2 / sympy 1.14 and
makes its set-ordered choices stable. As in the package's own ``generate.py``, problems whose question is longer
than 160 or whose answer is longer than 30 characters are dropped and re-drawn.

The parent (:func:`build`) reads the child's JSONL. Records: ``{"text": "Question: <q>\\nAnswer: <a>",
"domain": "math", "question", "answer", "module"}`` (``module`` like ``algebra__linear_1d``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import EmbeddedConfig, Provenance, package_version

TEXT_FORMAT = "Question: {question}\nAnswer: {answer}"


def module_seed(seed: int, module: str) -> int:
    return int(hashlib.sha256(f"{seed}:{module}".encode()).hexdigest()[:8], 16)


def format_problem(question: str, answer: str) -> str:
    return TEXT_FORMAT.format(question=question, answer=answer)


def generate(modules: list[str], per_module: int, seed: int = 0, regime: str = "train", progress: bool = False):
    """Yield records (in module order). Only call in a process started with ``PYTHONHASHSEED=0``."""
    from . import math_compat

    available = math_compat.flat_modules(regime)
    unknown = [m for m in modules if m not in available]
    if unknown:
        from bts.core.io import BTSError

        raise BTSError(f"unknown mathematics_dataset module(s) {', '.join(unknown)}; "
                       f"known: {', '.join(available)}")
    from mathematics_dataset import generate_settings as gs

    it = modules
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(modules, desc="math: modules", unit="module", file=sys.stderr)
    for name in it:
        fn = available[name]
        math_compat.seed_all(module_seed(seed, name))
        made = 0
        while made < per_module:
            problem = fn()
            question, answer = str(problem.question), str(problem.answer)
            if len(question) > gs.MAX_QUESTION_LENGTH or len(answer) > gs.MAX_ANSWER_LENGTH:
                continue
            made += 1
            yield {"text": format_problem(question, answer), "domain": "math", "question": question,
                   "answer": answer, "module": name}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    # the child must import this very package (also when it is not installed, e.g. tests from a checkout)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class GeneratorProcess:
    """A running generator subprocess (started by :func:`start`); :meth:`result` waits and reads its output."""

    def __init__(self, modules, per_module: int, seed: int, regime: str = "train", progress: bool = False,
                 workdir: str | os.PathLike | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="bts-math-", dir=workdir)
        self.out = Path(self._dir.name) / "problems.jsonl"
        self.cmd = [sys.executable, "-m", "bts.data.sources.math", "--modules", ",".join(modules),
                    "--per-module", str(per_module), "--seed", str(seed), "--regime", regime, "--out", str(self.out)]
        if progress:
            self.cmd.append("--progress")
        self.started = time.time()
        # with progress the child's bar goes straight to our stderr (a pipe would only be read at the end)
        self.proc = subprocess.Popen(self.cmd, env=_child_env(), stdout=subprocess.DEVNULL,
                                     stderr=None if progress else subprocess.PIPE, text=True)

    def close(self) -> None:
        """Stop the child if it still runs and remove its output folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self._dir.cleanup()

    def result(self, timeout: float | None = 900) -> list[dict]:
        from bts.core.io import BTSError

        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            self._dir.cleanup()
            raise BTSError(f"math problem generation timed out after {timeout:.0f}s") from None
        try:
            if self.proc.returncode != 0:
                lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
                raise BTSError(f"math problem generation failed (exit {self.proc.returncode}): "
                               f"{lines[-1] if lines else 'see the messages above'}")
            with open(self.out, encoding="utf-8") as f:
                return [json.loads(line) for line in f]
        finally:
            self._dir.cleanup()


def start(config: EmbeddedConfig, progress: bool | None = None, workdir=None) -> GeneratorProcess:
    show = sys.stderr.isatty() if progress is None else progress
    return GeneratorProcess(list(config.math_modules), config.math_per_module, config.math_seed, "train",
                            progress=show, workdir=workdir)


def provenance(config: EmbeddedConfig, records: list[dict]) -> Provenance:
    from . import math_compat

    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("module", "?")] = counts.get(r.get("module", "?"), 0) + 1
    return Provenance(
        sources=[{"name": "mathematics_dataset", "version": package_version("mathematics-dataset"),
                  "regime": "train (full entropy range)", "modules": counts, "seed": config.math_seed,
                  "pythonhashseed": 0, "licence": "Apache-2.0", "compat_patches": list(math_compat.PATCHES)}],
        packages={"mathematics-dataset": package_version("mathematics-dataset"), "sympy": package_version("sympy"),
                  "numpy": package_version("numpy")},
    )


def build(config: EmbeddedConfig, wheel_dir: Path | None = None, progress: bool | None = None):
    """Return ``(records, provenance)`` of the math domain (runs the generator subprocess and waits)."""
    records = start(config, progress).result()
    return records, provenance(config, records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bts.data.sources.math",
                                description="Generate mathematics_dataset problems as JSONL (needs PYTHONHASHSEED=0).")
    p.add_argument("--modules", default=",".join(EmbeddedConfig().math_modules),
                   help="comma-separated module names, e.g. algebra__linear_1d,arithmetic__mul")
    p.add_argument("--per-module", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regime", default="train", choices=["train", "interpolate", "extrapolate"])
    p.add_argument("--out", default="-", help="output JSONL file ('-' = stdout)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        print("error: run with PYTHONHASHSEED=0 set before the interpreter starts (output would not be "
              "deterministic)", file=sys.stderr)
        return 2
    from . import math_compat

    modules = [m for m in args.modules.split(",") if m]
    available = math_compat.flat_modules(args.regime)
    unknown = [m for m in modules if m not in available]
    if unknown:
        print(f"error: unknown mathematics_dataset module(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    records = generate(modules, args.per_module, args.seed, args.regime, args.progress)
    if args.out == "-":
        for rec in records:
            sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
        return 0
    # temp file + rename (bts.core.io is not imported here: it pulls in torch, which the child does not need)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
