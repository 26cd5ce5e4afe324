"""A task graph run by a pool of worker processes: each task starts once the tasks it runs after are done, up to
``jobs`` at a time (an ``exclusive`` task alone, with every core); what a task does is the caller's.

Each task runs in its own spawned process with a fixed thread budget (``cpu_count // jobs``, every core for an
exclusive one) and its stdout/stderr in ``<log_dir>/<name>.log``; the parent says when a task starts and ends, and
every ``HEARTBEAT_S`` seconds what runs and the last progress line of its log. A failed task stops the start of new
ones; the running ones finish, then the first failure is raised (a ``BTSError`` as is).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from bts.core.io import BTSError

HEARTBEAT_S = 60.0
"""Seconds between the heartbeat lines of a parallel run (each running stage and its last progress line)."""


@dataclass(frozen=True)
class Task:
    """``fn(*args, threads=n)`` in a worker process; ``fn`` and ``args`` must pickle (a module-level function)."""

    name: str
    fn: Callable
    args: tuple
    after: tuple[str, ...] = ()
    exclusive: bool = False


def run_graph(tasks: Sequence[Task], jobs: int, log_dir: Path, say: Callable[[str], None]) -> dict:
    """Run ``tasks`` (listed in dependency order) with up to ``jobs`` at a time; ``{name: fn's return value}`` in
    the order they finished."""
    cores = os.cpu_count() or 1
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(tasks)
    results: dict = {}
    running: dict = {}
    failure: BaseException | None = None
    total = len(pending)
    # spawn: a forked copy of a process that already ran torch/Lightning is not safe to train in
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_die_with_parent) as pool:
        while (pending and failure is None) or running:
            ready = [t for t in pending if all(d in results for d in t.after)] if failure is None else []
            for task in ready:
                busy = [t for t, _, _ in running.values()]
                if len(busy) >= jobs or any(t.exclusive for t in busy) or (task.exclusive and busy):
                    break
                # a fixed thread count per task (not "whatever is free now") keeps results independent of timing
                threads = cores if task.exclusive else max(1, cores // jobs)
                pending.remove(task)
                log = log_dir / f"{task.name}.log"
                say(f"{task.name}: started (log: {log})")
                fut = pool.submit(_run_logged, task.fn, task.args, threads, str(log))
                running[fut] = (task, time.perf_counter(), log)
            if not running:  # cannot happen with tasks in dependency order (Pipeline.prepare checks it)
                raise BTSError(f"no stage can start: {', '.join(t.name for t in pending)}")
            done, _ = wait(running, timeout=HEARTBEAT_S, return_when=FIRST_COMPLETED)
            if not done:  # a heartbeat: what runs, for how long, and its last progress line
                now = time.perf_counter()
                say("running: " + "; ".join(
                    f"{t.name} {now - started:.0f} s" + (f" ({line})" if (line := _last_progress(log)) else "")
                    for t, started, log in running.values()))
            for fut in done:
                task, started, log = running.pop(fut)
                try:
                    results[task.name] = fut.result()
                except BaseException as e:  # noqa: BLE001 - reported below with the task's log
                    failure = failure or e
                    say(f"{task.name}: FAILED after {time.perf_counter() - started:.0f} s: {e}\n"
                        f"  last lines of {log}:\n" + _tail(log))
                    continue
                say(f"{task.name}: done in {time.perf_counter() - started:.0f} s ({len(results)}/{total} stages)")
    if failure is not None:
        raise failure if isinstance(failure, BTSError) else BTSError(f"a stage failed: {failure}")
    return results


def _run_logged(fn: Callable, args: tuple, threads: int, log: str):
    """In a worker: ``fn(*args, threads=threads)`` with the process's stdout/stderr (progress lines included:
    ``tail -f`` the log to follow a task) going to ``log``."""
    # redirect the file descriptors, not sys.stdout: Lightning's logging handlers and C-level output write to them
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        return fn(*args, threads=threads)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


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
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass
