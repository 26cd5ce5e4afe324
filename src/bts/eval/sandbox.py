"""Isolated execution of model-written code (HumanEval completions).

A job runs in new user, mount, pid, network, ipc and uts namespaces that it creates itself with ``unshare(2)``
(``bts.eval.sandbox_child``): no root and no extra package, only a kernel that allows unprivileged user
namespaces. Run by root, the sandbox's processes are ``nobody`` outside; otherwise they are the calling user.

* the whole filesystem is read-only; the only writable place is a private tmpfs on ``/tmp`` (the working
  directory, 64 MiB) that disappears with the sandbox; ``/dev`` and ``/run`` are empty, ``/proc`` shows only the
  sandbox's processes;
* no network (a fresh network namespace has only a loopback device, down);
* every capability dropped (empty bounding set, ``SECBIT_NOROOT``, ``no_new_privs``);
* resource limits: address space, CPU seconds, processes (``RLIMIT_NPROC``), file size, open files, no core;
* a wall-clock timeout after which the sandbox's first process is killed, which ends every process in it.

The verdict cannot be forged by the completion: the problem's tests run in a separate trusted process (the judge,
``bts.eval.sandbox_child``) that calls the completion's function in another process and reads back only Python
literals; the judge prints the job's nonce (sent on its stdin, never in a file, argument or environment) only
after ``check`` returned, and the harness counts a pass only for that nonce with exit status 0.

Where the namespaces cannot be created (user namespaces disabled, a container that forbids them), execution is
refused with ``BTSError`` unless ``allow_unsafe`` is set; the unsafe mode keeps the judge/candidate split and the
resource limits but not the filesystem or network isolation.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bts.io import BTSError

UNSAFE_HINT = "pass --allow-unsafe-exec (EvalConfig.allow_unsafe_exec) to run it without isolation"


@dataclass
class ExecResult:
    passed: bool
    result: str  # "passed" | "timed out" | "failed: ..."


def _child_code() -> str:
    src = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")
    return f"SOURCE = {src!r}\n{src}"


def _python() -> str:
    # the base interpreter: with -I -S the child needs only the standard library, not the virtualenv
    return os.path.realpath(sys.executable)


def _limits(timeout: float, memory_mb: int) -> dict:
    return {"memory_bytes": memory_mb << 20, "cpu_seconds": max(1, int(timeout) + 1), "processes": 32,
            "file_bytes": 1 << 20, "open_files": 64, "scratch_mb": 64}


def _sandbox_command(role: str, *args: str) -> list[str]:
    return [_python(), "-I", "-S", "-B", "-c", _child_code(), role, *args]


@functools.cache
def isolation_problem() -> str | None:
    """None when the sandbox works here, else why not (one line)."""
    cmd = _sandbox_command("init", json.dumps({**_limits(5, 256), "probe": True}))
    try:
        r = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot start the sandbox: {e}"
    if r.returncode != 0:
        lines = r.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"the sandbox does not start here ({lines[-1] if lines else f'exit code {r.returncode}'})"
    return None


def require_isolation(allow_unsafe: bool) -> bool:
    """Whether jobs will run isolated; raises ``BTSError`` when they cannot and unsafe execution is not allowed."""
    problem = isolation_problem()
    if problem is None:
        return True
    if allow_unsafe:
        return False
    raise BTSError(f"refusing to execute model-written code: {problem}; {UNSAFE_HINT}")


def run_job(program: str, tests: str, entry_point: str, timeout: float = 5.0, memory_mb: int = 1024,
            allow_unsafe: bool = False) -> ExecResult:
    """Run ``tests`` (which define ``check``) against ``entry_point`` of ``program`` in the sandbox."""
    isolated = require_isolation(allow_unsafe)
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "program": program, "tests": tests, "entry_point": entry_point}).encode()
    limits = json.dumps(_limits(timeout, memory_mb))
    with tempfile.TemporaryDirectory(prefix="bts-exec-") as tmp:
        cmd = _sandbox_command("init" if isolated else "tests", limits)
        proc = subprocess.Popen(cmd, cwd=tmp, env={"PYTHONHASHSEED": "0", "LANG": "C.UTF-8"},
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(job, timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc, isolated)
            return ExecResult(False, "timed out")
        finally:
            if proc.poll() is None:  # pragma: no cover - defensive
                _kill_group(proc)
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0 and text == nonce:
        return ExecResult(True, "passed")
    if text.startswith("failed: "):
        return ExecResult(False, text)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult(False, f"failed: sandbox exit code {proc.returncode}" + (f" ({lines[-1]})" if lines else ""))


def _end(proc: subprocess.Popen, isolated: bool) -> None:
    """Stop a job. The sandbox's first process answers SIGTERM by killing the sandbox and exits once it is empty,
    so nothing of it outlives this call; an unisolated job is killed with its process group."""
    if isolated:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
            return
        except subprocess.TimeoutExpired:  # pragma: no cover - defensive
            pass
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()
