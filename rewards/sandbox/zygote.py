"""The isolated process behind a sandbox pool: it confines itself once, then forks one disposable child per job.

``rewards.sandbox.pool`` starts it as a fresh interpreter and talks length-prefixed JSON over its stdin/stdout.
Why a zygote: a job needs an interpreter untouched by earlier untrusted input, but paying Python start-up
plus heavy imports (sympy, reasoning-gym) per job would cost far more than most jobs. Forking a warm process that never
runs untrusted code itself gives both.

Isolation ("strong" mode, needs Linux namespaces):
- the zygote enters new mount, network and IPC namespaces (plus a user namespace when not root): no network
  interface but a loopback that is down; /root and /home hidden behind empty tmpfs; the whole filesystem
  read-only but for a private /tmp (matplotlib, imported by reasoning-gym, insists on a writable cache
  directory). The trainer's import path (sent by the pool) and the Python installation are bound back in,
  read-only, wherever they are hidden: under a home, or under /tmp (``pip install --target /tmp/site``);
- each job gets a new PID namespace whose init is the job (when it ends or is killed, every process it
  started dies with it), a fresh size-limited tmpfs at /tmp as working directory and HOME (the import path
  under /tmp bound back in, read-only), its own /proc, a scrubbed environment, rlimits (address space, CPU,
  processes, file size, open files, no core dumps), an unprivileged identity and no_new_privs. Started as
  root, jobs run as a uid no account uses (JOB_UID_BASE + zygote pid); otherwise as the user, with every
  capability dropped, so files the user can read outside /root and /home stay readable (never writable).
Where namespaces are forbidden (e.g. Docker's default seccomp profile) the zygote runs "weak": rlimits, a
private temporary directory, a non-root uid when started as root, and an audit hook that refuses sockets
(bypassable through ctypes or a subprocess). The pool only accepts weak mode when asked to (rewards.sandbox.pool).

A job is ``module:function`` returning an iterable; every item it yields is written to the output pipe on a
line that starts with a per-job secret nonce, so output the job's untrusted code prints cannot pass for a
result. Items are bool, float, str or None, encoded with C-level functions bound before any untrusted
code runs. The nonce is in the job's memory: code running in the job's process can find it.

A pair (a message with ``candidate``, then the judge's request) is two jobs, each confined as above, joined by
two pipes (``channel``, descriptors CHANNEL_FDS in each). The candidate is forked first, from the zygote, which
never reads a judge's request: the judge's own parent reads it from stdin. So the candidate's memory holds no
test, expected value or nonce of its own job, past or present; it shares no PID namespace (in strong mode),
files or output pipe with the judge, and only the judge's output is parsed for results. The candidate is
killed when the judge exits; the judge sees end of file as soon as the candidate dies. What a candidate can
still find in its memory: earlier programs, io inputs and replies (outputs, verdict lines) of this zygote's jobs. In weak mode both run under
one uid; the judge makes itself non-dumpable, so the candidate cannot ptrace it or read its memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import importlib
import json
import os
import resource
import select
import signal
import struct
import sys
import tempfile
import time
from base64 import b64encode
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # one number on every architecture (allocated after the syscall tables were unified)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522
JOB_UID_BASE = 2_000_000_000  # + zygote pid: a uid no account uses, unique among live zygotes (root mode)
HIDDEN_DIRS = ("/root", "/home")
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"
CHANNEL_FDS = (4, 5)  # where a paired job finds its channel: (read end, write end)
START_TIMEOUT_S = 30.0  # for a judge's parent to read its request (trusted code reading from the pool)

_libc = ctypes.CDLL(None, use_errno=True)
_kept: list[str] = []  # what isolate() keeps visible: the import path and the Python installation


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)), f"mount {target}")


# ---------------------------------------------------------------- framing (shared with rewards.sandbox.pool)

def encode_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_message(fd: int) -> dict[str, Any] | None:
    header = _read_exact(fd, 4)
    if header is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", header)[0])
    return None if body is None else json.loads(body)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- zygote-wide isolation

def _outermost(paths: Iterable[str]) -> list[str]:
    """Existing real paths with every path nested inside another one dropped."""
    kept: list[str] = []
    for path in sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)}):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _read_only(path: str) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr {path}")


def _cover(directory: str, keep: list[str], options: str) -> None:
    """Mount an empty tmpfs over ``directory``, binding back, read-only, the paths in it Python needs."""
    inside = [p for p in keep if p.startswith(directory.rstrip("/") + "/")]
    handles = {p: os.open(p, os.O_PATH) for p in inside}
    _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path, handle in handles.items():
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{handle}", path, None, MS_BIND | MS_REC)
        _read_only(path)
        os.close(handle)


def isolate(hide: list[str], import_path: list[str]) -> None:
    """Enter new namespaces, hide home directories and make the filesystem read-only; raise OSError if refused.

    ``import_path`` (the trainer's sys.path) and the Python installation stay visible, read-only, even where
    they lie under a hidden home or under /tmp (``pip install --target /tmp/site`` + PYTHONPATH).
    """
    global _kept
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC
    if os.geteuid() == 0:
        _check(_libc.unshare(flags), "unshare")
    else:
        uid, gid = os.getuid(), os.getgid()
        _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _kept = _outermost([*import_path, sys.prefix, sys.base_prefix, sys.exec_prefix,
                        os.path.dirname(os.path.realpath(sys.executable))])
    for directory in _outermost(hide):
        if os.path.isdir(directory) and not any(directory.startswith(k.rstrip("/") + "/") or directory == k
                                                for k in _kept):
            _cover(directory, _kept, "mode=0755,size=1m")
    _read_only("/")
    _cover("/tmp", _kept, "size=64m,mode=1777")  # caches of preloaded modules


# ---------------------------------------------------------------- per-job confinement (runs in the job)

def _address_space_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _set_limits(limits: dict[str, Any], processes: bool) -> None:
    """Memory is budgeted on top of what the forked interpreter already maps (its preloaded imports, sympy's
    above all), so a job's limit is what the job itself may add."""
    cpu = int(limits["timeout_s"]) + 1
    memory = _address_space_now() + limits["memory_mb"] * 2**20
    file_size = limits["file_mb"] * 2**20
    for which, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_NOFILE, limits["open_files"])):
        resource.setrlimit(which, (value, value))
    if processes:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))


def _job_uid() -> int:
    return JOB_UID_BASE + _zygote_pid


def _drop_privileges(strong: bool) -> None:
    if os.geteuid() == 0:
        uid = _job_uid()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    elif strong:
        data = (_CapData * 2)()
        _check(_libc.capset(ctypes.byref(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")


def _refuse_sockets(event: str, args: tuple[Any, ...]) -> None:
    if event.startswith("socket."):
        raise PermissionError("network access is disabled in the sandbox")


def _confine(limits: dict[str, Any], strong: bool, workdir: str) -> None:
    """Everything a job gets before its untrusted input is touched: files, environment, limits, identity."""
    if strong:
        ids = f",uid={_job_uid()},gid={_job_uid()}" if os.geteuid() == 0 else ""
        _cover(workdir, _kept, f"size={limits['file_mb']}m,mode=0700{ids}")
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:  # proc is partly masked (containers): show none rather than the host's processes
            _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": JOB_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
    tempfile.tempdir = None
    _set_limits(limits, processes=strong or os.geteuid() == 0)
    _drop_privileges(strong)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # cleared by setuid: set after
    if not strong:
        sys.addaudithook(_refuse_sockets)


def _emitter(nonce: str, fd: int) -> Callable[[Any], None]:
    """Write one result line. Bound to C-level functions now, so untrusted code cannot patch the encoding."""
    write, type_of, prefix = os.write, type, f"\n{nonce} ".encode()
    encode_str = json.encoder.c_encode_basestring_ascii or json.encoder.py_encode_basestring_ascii
    literals = {True: b"true", False: b"false", None: b"null"}

    def emit(item: Any) -> None:
        kind = type_of(item)
        if kind is bool or item is None:
            payload = literals[item]
        elif kind is float:
            payload = float.__repr__(item).encode()
        elif kind is str:
            payload = encode_str(item).encode()
        else:
            raise TypeError(f"a job may yield bool, float, str or None, not {kind.__name__}")
        write(fd, prefix + payload + b"\n")

    return emit


def _resolve(target: str) -> Callable[..., Iterable[Any] | None]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _job(request: dict[str, Any], strong: bool, workdir: str, paired: bool) -> None:
    """The job process (PID-namespace init in strong mode): confine, run the target, report, exit.

    A request without a nonce is a candidate: what its target returns is no result and is not looked at.
    """
    os.setpgid(0, 0)
    _confine(request["limits"], strong, workdir)
    args = {**request["args"], "channel": CHANNEL_FDS} if paired else request["args"]
    judge = "nonce" in request
    if judge and paired:  # a weak-mode candidate has the same uid: it must not ptrace or read the judge
        _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
    emit = _emitter(request["nonce"], os.dup(1)) if judge else None
    try:
        results = _resolve(request["target"])(**args)
        for item in results if emit else ():
            emit(item)
    finally:
        sys.stdout.flush()  # what the job printed, for whoever debugs it


def _place(fds: list[int]) -> None:
    """Make ``fds`` the process's descriptors 0, 1, ... in order, and close every other one."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1024) for fd in fds]
    for number, fd in enumerate(high):
        os.dup2(fd, number)
    os.closerange(len(fds), 65536)


def _job_parent(request: dict[str, Any] | None, strong: bool, fds: list[int], paired: bool) -> None:
    """Forked by the zygote: enters the job's mount and PID namespaces, forks the job, reports its exit.

    ``request`` None: the judge of a pair, which reads its request from the zygote's stdin itself, so that
    the zygote, which forks every later candidate, never holds a judge's tests or nonce.
    ``fds``: the job's stdout, stderr, control pipe (job pid, then exit code) and, paired, its channel ends.
    """
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # the zygote's death ends the job
    if request is None:
        request = _read_message(0)
        if request is None:
            return
    _place([os.open(os.devnull, os.O_RDONLY), *fds])
    workdir = "/tmp" if strong else tempfile.mkdtemp(prefix="rlreason-job-")
    if strong:
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare job")
    elif os.geteuid() == 0:
        os.chown(workdir, _job_uid(), _job_uid())
    job = os.fork()
    if job == 0:
        os.close(3)
        try:
            _job(request, strong, workdir, paired)
        except BaseException:  # the traceback goes to the output pipe, for whoever debugs the job
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        os._exit(0)
    os.closerange(4, 65536)  # the channel ends are the job's: its peer sees end of file when the job is gone
    os.write(3, f"{job}\n".encode())
    _, status = os.waitpid(job, 0)
    if not strong:
        with contextlib.suppress(ProcessLookupError):  # what the job left behind (a PID namespace needs no help)
            os.killpg(job, signal.SIGKILL)
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    os.write(3, f"{os.waitstatus_to_exitcode(status)}\n".encode())


class _Started(NamedTuple):
    parent: int
    output: int  # read end of the job's stdout and stderr
    control: int  # read end of its control pipe


def _start(request: dict[str, Any] | None, strong: bool, channel: list[int], paired: bool) -> _Started:
    out_r, out_w = os.pipe()
    control_r, control_w = os.pipe()
    parent = os.fork()
    if parent == 0:
        try:
            _job_parent(request, strong, [out_w, out_w, control_w, *channel], paired)
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(control_w)
    return _Started(parent, out_r, control_r)


class _Outputs:
    """What the jobs being watched wrote, per pipe, and its total size."""

    def __init__(self, fds: list[int], cap: int) -> None:
        self.chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
        self.size, self.cap = 0, cap

    def read(self, fd: int) -> bool:
        """Append what ``fd`` has now (at most one byte past the cap); False once it is at end of file."""
        chunk = os.read(fd, min(65536, self.cap - self.size + 1))
        self.chunks[fd].append(chunk)
        self.size += len(chunk)
        return bool(chunk)

    def overflowed(self) -> bool:
        return self.size > self.cap

    def drain(self) -> None:
        """Read what the pipes hold now, without waiting, up to the cap."""
        for fd in self.chunks:
            os.set_blocking(fd, False)
            with contextlib.suppress(BlockingIOError):
                while not self.overflowed() and self.read(fd):
                    pass

    def parts(self) -> list[bytes]:
        """Each pipe's bytes, in order, cut so that together they fit the cap."""
        kept, room = [], self.cap
        for chunks in self.chunks.values():
            kept.append(b"".join(chunks)[:room])
            room -= len(kept[-1])
        return kept


def _collect(outputs: _Outputs, control_r: int, control: bytes, deadline: float) -> tuple[str, bytes]:
    """Read the outputs until the job behind ``control_r`` exits, they overflow, or ``deadline`` passes."""
    watched = [*outputs.chunks, control_r]
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", control
        for fd in select.select(watched, [], [], remaining)[0]:
            if fd == control_r:
                data = os.read(control_r, 64)
                control += data
                if not data or len(_numbers(control)) == 2:  # the job exited: drain what it wrote, then stop
                    outputs.drain()
                    return ("overflow" if outputs.overflowed() else "ok"), control
            elif not outputs.read(fd):
                watched.remove(fd)
            if outputs.overflowed():
                return "overflow", control


def _numbers(control: bytes) -> list[int]:
    return [int(x) for x in control.split(b"\n")[:-1]]


def _wait_for_pid(control_r: int, timeout_s: float) -> bytes:
    """The control pipe's first line (the job's pid) if it comes within ``timeout_s``, else what came."""
    control, deadline = b"", time.monotonic() + timeout_s
    while not _numbers(control) and select.select([control_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
        data = os.read(control_r, 64)
        if not data:
            break
        control += data
    return control


def _stop(started: _Started, control: bytes, kill: bool) -> None:
    """Wait for a job parent; first kill the job, the init of its PID namespace (which takes everything it
    started with it, and lets its parent return), or the parent while the job's pid is not known."""
    numbers = _numbers(control)
    if kill and len(numbers) < 2:
        with contextlib.suppress(ProcessLookupError):
            os.kill(numbers[0] if numbers else started.parent, signal.SIGKILL)
    os.waitpid(started.parent, 0)


def _reply(status: str, control: bytes, outputs: list[bytes], started: float) -> dict[str, Any]:
    numbers = _numbers(control)
    return {"status": status, "exit_code": numbers[1] if len(numbers) == 2 else None,
            "output": b64encode(outputs[0]).decode(), "candidate_output": b64encode(b"".join(outputs[1:])).decode(),
            "seconds": time.monotonic() - started}


def run_job(request: dict[str, Any], strong: bool) -> dict[str, Any]:
    limits, started = request["limits"], time.monotonic()
    job = _start(request, strong, [], False)
    outputs = _Outputs([job.output], limits["output_bytes"])
    status, control = _collect(outputs, job.control, b"", started + limits["timeout_s"])
    _stop(job, control, status != "ok")
    os.close(job.output)
    os.close(job.control)
    return _reply(status, control, outputs.parts(), started)


def run_pair(request: dict[str, Any], strong: bool) -> dict[str, Any] | None:
    """A candidate (``request["candidate"]``) and its judge, whose request is the next message on stdin.

    The candidate is forked first, from this process, which never reads a judge's request: the judge's parent
    reads it. None when that parent did not take its request (stdin would be out of step: the zygote stops).
    """
    limits, started = request["limits"], time.monotonic()
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    candidate = _start({**request["candidate"], "limits": limits}, strong, [calls_r, replies_w], True)
    judge = _start(None, strong, [replies_r, calls_w], True)
    for fd in (calls_r, calls_w, replies_r, replies_w):
        os.close(fd)
    control = _wait_for_pid(judge.control, START_TIMEOUT_S)
    outputs = _Outputs([judge.output, candidate.output], limits["output_bytes"])
    status = "error"
    if _numbers(control):
        status, control = _collect(outputs, judge.control, control, started + limits["timeout_s"])
    _stop(candidate, _wait_for_pid(candidate.control, 1.0), True)
    _stop(judge, control, status != "ok")
    if status != "overflow":
        outputs.drain()
    for fd in (judge.output, candidate.output, candidate.control, judge.control):
        os.close(fd)
    return None if status == "error" else _reply(status, control, outputs.parts(), started)


_zygote_pid = os.getpid()


def main() -> None:
    """Serve jobs until stdin closes. The first message configures; the reply says which isolation holds."""
    global _zygote_pid
    _zygote_pid = os.getpid()
    config = _read_message(0)
    if config is None:
        return
    sys.path[:] = config["sys_path"]
    strong, reason = config["isolation"] != "weak", "weak isolation was asked for"
    try:
        if strong:
            isolate(config["hide"], config["sys_path"])
    except OSError as exc:
        strong, reason = False, str(exc)
    if not strong and config["isolation"] == "strong":
        _write_all(1, encode_message({"error": f"namespaces unavailable ({reason})"}))
        return
    try:
        for name in config["preload"]:  # "module", or "module:function" to also call a warm-up function
            module, _, warm_up = name.partition(":")
            imported = importlib.import_module(module)
            if warm_up:
                getattr(imported, warm_up)()
    except Exception as exc:
        _write_all(1, encode_message({"error": f"preloading failed: {exc!r}"}))
        return
    gc.freeze()  # forked jobs then leave the preloaded objects' pages shared instead of copying them
    _write_all(1, encode_message({"ready": True, "strong": strong, "reason": reason}))
    while (request := _read_message(0)) is not None:
        reply = run_pair(request, strong) if "candidate" in request else run_job(request, strong)
        if reply is None:
            return
        _write_all(1, encode_message(reply))
