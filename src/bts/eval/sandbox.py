"""Isolated execution of model-written code (HumanEval completions).

A job runs in new user, mount, pid, network, ipc and uts namespaces that it creates itself with ``unshare(2)``
(``bts.eval.sandbox_child``): no root and no extra package, only a kernel that allows unprivileged user
namespaces. Run by root, the sandbox's processes are ``nobody`` outside; otherwise they are the calling user.

* the whole filesystem is read-only; the only writable place is a private tmpfs on ``/tmp`` (the working
  directory, 64 MiB) that disappears with the sandbox; ``/dev`` holds only ``null``, ``zero``, ``random`` and
  ``urandom``, ``/run`` is empty, ``/proc`` shows only the sandbox's processes;
* only the standard library can be imported: the interpreter runs isolated (``python -I -S``: no site-packages,
  no user site, no ``PYTHON*`` variables), so numpy & co. raise ``ImportError`` and fail the problem, as they
  would for HumanEval's reference executor on a bare interpreter;
* no network (a fresh network namespace has only a loopback device, down);
* every capability dropped (empty bounding set, ``SECBIT_NOROOT``, ``no_new_privs``);
* memory: a cap on the whole job, ``memory_mb`` for all its processes together. Where this process may create a
  cgroup v2 child with the memory controller (its own cgroup or its parent, writable, ``memory`` in
  ``cgroup.subtree_control``), the job runs in one with ``memory.max`` (no swap, ``memory.oom.group``: the
  kernel kills the whole job); elsewhere (cgroup v1 hosts, undelegated cgroups, read-only ``/sys/fs/cgroup`` in
  containers) the job's supervisor sums the anonymous and shared memory resident in its processes every 20 ms
  and kills the whole job when the sum passes the cap. Memory the kernel holds for the job (socket and pipe
  buffers) is not in that sum; System V IPC and POSIX message queues, whose memory belongs to no process, are
  turned off. Per process, ``RLIMIT_AS`` (also ``memory_mb``) stays as a second line;
* other resource limits per process: CPU seconds, processes (``RLIMIT_NPROC``, 32), file size (1 MiB), open
  files, no core;
* what the completion prints is discarded;
* a wall-clock timeout after which the supervisor kills the sandbox's first process, which ends every process in
  it.

The verdict cannot be forged by the completion: the problem's tests run in a separate trusted process (the judge,
``bts.eval.sandbox_child``) that calls the completion's function in another process and reads back only Python
literals; the judge prints the job's nonce (sent on its stdin, never in a file, argument or environment) only
after ``check`` returned, and the harness counts a pass only for that nonce with exit status 0.

Where the namespaces cannot be created (user namespaces disabled, a container that forbids them), execution is
refused with ``BTSError`` unless ``allow_unsafe`` is set; the unsafe mode keeps the judge/candidate split, the
memory cap and the resource limits but not the filesystem or network isolation: the completion can read and
write whatever the calling user can (run as root, it runs as root). Its supervisor is a child subreaper, so
every process the job starts, ``setsid`` daemons included, is killed when the job ends or times out. It cannot
end processes that the job has other services start (cron, ``at``, ``systemd-run``, a container daemon), nor,
since the completion runs as the same user, those of a completion that kills its supervisor first and then
leaves the job's session with ``setsid``.
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
import time
from dataclasses import dataclass
from pathlib import Path

from bts.core.io import BTSError
from bts.eval.sandbox_child import MEMORY_EXIT

UNSAFE_HINT = "pass --allow-unsafe-exec (EvalConfig.allow_unsafe_exec) to run it without isolation"
UNSAFE_WARNING = (
    "warning: running model-written code WITHOUT isolation (--allow-unsafe-exec): it can read and write whatever "
    "this user can and reach the network; the processes it starts, setsid daemons included, are killed when its "
    "job ends, but not processes it has other services start (cron, at, systemd-run) nor any left by code that "
    "first kills its supervisor"
)


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


def _limits(timeout: float, memory_mb: int, isolated: bool = True) -> dict:
    return {"memory_bytes": memory_mb << 20, "job_memory_bytes": memory_mb << 20, "poll_seconds": 0.02,
            "cpu_seconds": max(1, int(timeout) + 1), "processes": 32, "file_bytes": 1 << 20, "open_files": 64,
            "scratch_mb": 64, "isolated": isolated, "cgroup": None}


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


@functools.cache
def _warn_unsafe() -> None:  # once per process
    print(UNSAFE_WARNING, file=sys.stderr)


def require_isolation(allow_unsafe: bool) -> bool:
    """Whether jobs will run isolated; raises ``BTSError`` when they cannot and unsafe execution is not allowed
    (and warns, once, when it is)."""
    problem = isolation_problem()
    if problem is None:
        return True
    if allow_unsafe:
        _warn_unsafe()
        return False
    raise BTSError(f"refusing to execute model-written code: {problem}; {UNSAFE_HINT}")


def _cgroup_candidates() -> list[Path]:
    """This process's cgroup v2 directory and its parent's, where a job's cgroup could go (children of a cgroup
    get the memory controller only from its ``cgroup.subtree_control``, which a cgroup holding processes, like
    this one, cannot set unless it is the root)."""
    try:
        return _cgroup_dirs(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    except OSError:
        return []


def _cgroup_dirs(cgroup: str, mountinfo: str) -> list[Path]:
    """[own, parent] (or [own] at the top) from /proc/self/cgroup's ``0::`` line and the cgroup2 mount."""
    rel = next((line[3:] for line in cgroup.splitlines() if line.startswith("0::")), None)
    for line in mountinfo.splitlines() if rel else ():
        # id parent dev root mount-point options [optional fields] - fstype source super-options
        fields = line.split()
        if "-" not in fields[:-1] or fields[fields.index("-") + 1] != "cgroup2":
            continue
        inner = os.path.relpath(rel, fields[3])  # the mount may show a subtree only
        if not inner.startswith(".."):
            own = Path(fields[4], inner)
            return [own] if inner == "." else [own, own.parent]
    return []


def _offers_memory(parent: Path) -> bool:
    try:
        return "memory" in (parent / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def memory_cap_mechanism() -> str:
    """What holds a job's memory cap on this machine: ``"cgroup v2 under <dir>"`` or ``"supervisor"``."""
    for parent in _cgroup_candidates():
        if _offers_memory(parent) and os.access(parent, os.W_OK):
            return f"cgroup v2 under {parent}"
    return "supervisor"


def _job_cgroup(cap: int, name: str) -> Path | None:
    """A new cgroup v2 for one job, with ``memory.max`` = ``cap`` and no swap, where one can be made; else None."""
    for parent in _cgroup_candidates():
        try:
            if not _offers_memory(parent):
                continue
            (parent / name).mkdir()
        except OSError:
            continue
        cg = parent / name
        try:
            (cg / "memory.max").write_text(f"{cap}\n")
        except OSError:
            _remove_cgroup(cg)
            continue
        for knob, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):  # absent on some kernels
            try:
                (cg / knob).write_text(value + "\n")
            except OSError:
                pass
        return cg
    return None


def _read_keys(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def _finish_cgroup(cg: Path) -> bool:
    """Empty and remove a job's cgroup; whether the kernel killed something in it for its memory."""
    oom = _read_keys(cg / "memory.events").get("oom_kill", 0) > 0
    try:
        (cg / "cgroup.kill").write_text("1\n")  # Linux 5.14+; the supervisor has already ended the job anyway
    except OSError:
        pass
    _remove_cgroup(cg)
    return oom


def _remove_cgroup(cg: Path) -> None:
    deadline = time.monotonic() + 5.0
    while _read_keys(cg / "cgroup.events").get("populated", 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        cg.rmdir()
    except OSError:
        pass


def run_job(program: str, tests: str, entry_point: str, timeout: float = 5.0, memory_mb: int = 1024,
            allow_unsafe: bool = False) -> ExecResult:
    """Run ``tests`` (which define ``check``) against ``entry_point`` of ``program`` in the sandbox; ``memory_mb``
    caps the job's processes together (and each one's address space)."""
    isolated = require_isolation(allow_unsafe)
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "program": program, "tests": tests, "entry_point": entry_point}).encode()
    cg = _job_cgroup(memory_mb << 20, f"bts-job-{nonce[:12]}")
    limits = json.dumps({**_limits(timeout, memory_mb, isolated), "cgroup": cg and str(cg)})
    oom = False
    try:
        with tempfile.TemporaryDirectory(prefix="bts-exec-") as tmp:
            proc = subprocess.Popen(_sandbox_command("init", limits), cwd=tmp,
                                    env={"PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            try:
                out, err = proc.communicate(job, timeout=timeout)
            except subprocess.TimeoutExpired:
                _end(proc)
                return ExecResult(False, "timed out")
            finally:
                if proc.poll() is None:  # pragma: no cover - defensive
                    _kill_group(proc)
                elif not isolated:  # what stayed in the job's session if the completion killed its supervisor
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
    finally:
        if cg is not None:
            oom = _finish_cgroup(cg)
    if oom or proc.returncode == MEMORY_EXIT:
        return ExecResult(False, f"failed: memory: the job's processes used more than {memory_mb} MiB together")
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0 and text == nonce:
        return ExecResult(True, "passed")
    if text.startswith("failed: "):
        return ExecResult(False, text)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return ExecResult(False, f"failed: sandbox exit code {proc.returncode}" + (f" ({lines[-1]})" if lines else ""))


def _end(proc: subprocess.Popen) -> None:
    """Stop a job. Its supervisor answers SIGTERM by killing the job (isolated: the sandbox's first process, which
    ends the pid namespace; otherwise every process below it) and exits once nothing of it is left, so nothing
    outlives this call."""
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
