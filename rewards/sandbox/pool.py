"""Run untrusted work (model-written programs, scorers that eval model output) where it cannot hang or harm us.

    pool = shared_pool("logic", preload=("rewards.logic",))
    outcome = pool.run(Job("rewards.logic:score_job", {"dataset": ..., "entry": ..., "answer": ...}, Limits()))
    outcome.results   # what the job (a generator function) yielded, e.g. [1.0]

A pool keeps ``workers`` zygotes (see ``rewards.sandbox.zygote`` for the isolation each job gets) and runs one job per
zygote at a time, so ``map`` runs ``workers`` jobs in parallel. The trainer process decides pass/fail: a job's
results are only the lines that carry the job's secret nonce, which the parent generated; whatever else the job
prints, an exit status it chose, or a job killed half-way cannot add a result. Deadlines are hard: the zygote
kills a job (its whole PID namespace) at ``timeout_s``; if the zygote itself does not answer within a grace
period, the pool kills it and starts a fresh one for the next job.

The nonce only protects results from what a job prints, not from code running in the job's own process (a
frame or ``gc`` walk finds it). Work that runs model-written code must therefore be a pair: a ``Job`` with a
``candidate`` runs the candidate in a process of its own, forked before the job's request (args, nonce) was
read by anything it descends from, and the job (the judge) talks to it over a plain-data channel; only the
judge's output is read for results (``rewards.sandbox.harness``, ``rewards.sandbox.candidate``).

Batch deadlines: inside ``batch_deadline(seconds)`` (``rlreason.scoring`` sets one per reward call), ``map``
shares the time left among its jobs: each job starts with at most ``time left / rounds left`` (rounds of
``workers`` jobs), so hanging jobs cannot use up the time of the ones queued behind them; a job with no time
left is not run. Both are reported as ``status="timeout"`` with the results they managed.

Isolation (``isolation`` argument, else the RLREASON_SANDBOX environment variable): "strong" (default) needs
Linux namespaces and fails with an error naming the cause where they are refused; "fallback" uses them when
available and otherwise the weaker mode described in ``rewards.sandbox.zygote``; "weak" always uses the weaker mode.
Zygotes get the trainer's own ``sys.path`` (kept visible, read-only, wherever it lies) and are started per
process: after ``fork`` (multiprocessing) a child's pools forget the parent's zygotes and start their own.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import math
import os
import secrets
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from base64 import b64decode
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Queue
from typing import Any, NamedTuple

from rewards.sandbox.zygote import JOB_PATH, encode_message

ISOLATION_MODES = ("strong", "fallback", "weak")
START_TIMEOUT_S = 120.0
GRACE_S = 10.0
MAX_WORKERS = 8
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from rewards.sandbox.zygote import main; main()"
_ZYGOTE_ENV = {"PATH": JOB_PATH, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/matplotlib"}
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("sandbox_deadline", default=None)


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, or stopped answering), as opposed to the job failing."""


class _Closed(SandboxError):
    """The zygote's pipe closed: it died (and may be replaced), as opposed to missing a deadline."""


@dataclass(frozen=True)
class Limits:
    """What one job may use. Defaults suit programs checked by unit tests."""

    timeout_s: float = 10.0  # wall clock for the whole job; CPU time is capped at the same number of seconds
    memory_mb: int = 1024  # address space on top of what the forked interpreter already maps
    processes: int = 32  # processes + threads alive at once
    file_mb: int = 64  # size of the job's tmpfs and of any single file it writes
    open_files: int = 64
    output_bytes: int = 1 << 20  # everything the job writes to stdout/stderr, results included


class Candidate(NamedTuple):
    """The untrusted half of a paired job: ``target(**args, channel=(read_fd, write_fd))``, its result unused."""

    target: str
    args: dict[str, Any]


class Job(NamedTuple):
    target: str  # "module:function" returning an iterable of bool | float | str | None
    args: dict[str, Any]
    limits: Limits = Limits()
    candidate: Candidate | None = None  # when set, ``target`` also gets ``channel`` connected to it; same limits


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "timeout" | "overflow" (wrote more than output_bytes) | "error" (the sandbox failed)
    results: list[Any]  # the nonce-framed values the job yielded, in order, up to the first damaged one
    output: bytes  # the job's raw output (prints, tracebacks), then its candidate's, up to the cap, for debugging
    exit_code: int | None
    seconds: float


@contextlib.contextmanager
def batch_deadline(seconds: float | None) -> Iterator[None]:
    """Within this block, ``SandboxPool.map`` calls finish within ``seconds`` from now (None: no deadline)."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def parse_results(output: bytes, nonce: str) -> list[Any]:
    """The values on the nonce-marked lines of ``output``; stops at the first line that is not valid JSON."""
    results = []
    for piece in output.split(f"\n{nonce} ".encode())[1:]:
        line, newline, _ = piece.partition(b"\n")
        try:
            value = json.loads(line)
        except ValueError:
            break
        if not newline:
            break
        results.append(value)
    return results


class _Zygote:
    def __init__(self, preload: Sequence[str], isolation: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOT, _PROJECT_ROOT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_ZYGOTE_ENV, start_new_session=True, cwd="/",
        )
        self._buffer = b""
        config = {"sys_path": [os.path.abspath(p) for p in sys.path if p], "preload": list(preload),
                  "isolation": isolation, "hide": ["/root", "/home", os.path.expanduser("~")]}
        reply = self.request([config], START_TIMEOUT_S)
        if "error" in reply:
            self.kill()
            hint = "; RLREASON_SANDBOX=fallback accepts weaker isolation" if isolation == "strong" else ""
            raise SandboxError(f"sandbox could not start: {reply['error']}{hint}")
        self.strong: bool = reply["strong"]
        self.reason: str = reply["reason"]

    def request(self, messages: list[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
        """Send messages and wait for the one reply; on a missed deadline or a dead zygote, kill it and raise."""
        try:
            os.write(self.process.stdin.fileno(), b"".join(map(encode_message, messages)))
            deadline = time.monotonic() + timeout_s
            (size,) = struct.unpack(">I", self._read(4, deadline))
            return json.loads(self._read(size, deadline))
        except OSError as exc:
            self.kill()
            raise _Closed(f"sandbox worker died (exit {self.process.returncode})") from exc
        except SandboxError:
            self.kill()
            raise

    def _read(self, size: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        while len(self._buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise SandboxError("sandbox worker missed its deadline")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _Closed("sandbox worker died")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.forget()

    def forget(self) -> None:
        """Close this process's ends of the pipes; the zygote is left to whoever started it."""
        self.process.stdin.close()
        self.process.stdout.close()


def _default_workers() -> int:
    return int(os.environ.get("RLREASON_SANDBOX_WORKERS", min(os.cpu_count() or 1, MAX_WORKERS)))


def _messages(job: Job, limits: Limits, nonce: str) -> list[dict[str, Any]]:
    """What the zygote reads: the request; for a pair, the candidate's part first (read by the zygote) and then
    the judge's (read by the judge's own parent, so the zygote never holds it)."""
    request = {"target": job.target, "args": job.args, "nonce": nonce, "limits": asdict(limits)}
    if job.candidate is None:
        return [request]
    candidate = {"target": job.candidate.target, "args": job.candidate.args}
    return [{"candidate": candidate, "limits": asdict(limits)}, request]


class SandboxPool:
    """``workers`` isolated zygotes that have imported ``preload`` (modules, or "module:function" to also call a
    warm-up function); started on first use, restarted when killed."""

    def __init__(self, preload: Sequence[str] = (), workers: int | None = None, isolation: str | None = None):
        self.preload = tuple(preload)
        self.workers = workers or _default_workers()
        self.isolation = isolation or os.environ.get("RLREASON_SANDBOX", "strong")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        self.strong: bool | None = None  # known once a zygote has started
        self._fresh()
        _POOLS.add(self)

    def _fresh(self) -> None:
        self._idle: Queue[_Zygote | None] = Queue()
        for _ in range(self.workers):
            self._idle.put(None)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")

    def _forget(self) -> None:
        """In a forked child: drop the parent's zygotes and threads (they are the parent's to use and stop)."""
        for zygote in list(self._idle.queue):
            if zygote is not None:
                zygote.forget()
        self._fresh()

    def run(self, job: Job) -> Outcome:
        """Run one job; raises SandboxError only when no zygote can be started at all."""
        return self._run(job, job.limits)

    def _run(self, job: Job, limits: Limits) -> Outcome:
        messages = _messages(job, limits, nonce := secrets.token_hex(16))
        zygote, reply = self._idle.get(), None
        try:
            for _ in range(2):  # a zygote found dead when the job arrives is replaced once
                if zygote is not None and not zygote.alive():
                    zygote.kill()
                    zygote = None
                if zygote is None:
                    zygote = _Zygote(self.preload, self.isolation)
                    self.strong = zygote.strong
                try:
                    reply = zygote.request(messages, limits.timeout_s + GRACE_S)
                    break
                except SandboxError as exc:
                    zygote = None
                    if not isinstance(exc, _Closed):
                        break
            if reply is None:
                return Outcome("error", [], b"", None, limits.timeout_s + GRACE_S)
            output = b64decode(reply["output"])
            return Outcome(reply["status"], parse_results(output, nonce), output + b64decode(reply["candidate_output"]),
                           reply["exit_code"], reply["seconds"])
        finally:
            self._idle.put(zygote)

    def map(self, jobs: Sequence[Job], deadline: float | None = None) -> list[Outcome]:
        """Run ``jobs`` in parallel, ``workers`` at a time; outcomes in the order of ``jobs``.

        ``deadline`` (``time.monotonic()`` seconds; default: the enclosing ``batch_deadline``): the time left
        is shared among the jobs not yet started (see the module docstring).
        """
        deadline = _DEADLINE.get() if deadline is None else deadline
        if deadline is None:
            return list(self._executor.map(self.run, jobs))
        waiting, lock = [len(jobs)], threading.Lock()

        def run_in_share(job: Job) -> Outcome:
            with lock:
                rounds = math.ceil(waiting[0] / self.workers)
                waiting[0] -= 1
            share = (deadline - time.monotonic()) / rounds
            if share <= 0:
                return Outcome("timeout", [], b"", None, 0.0)
            return self._run(job, replace(job.limits, timeout_s=min(job.limits.timeout_s, share)))

        return list(self._executor.map(run_in_share, jobs))

    def close(self) -> None:
        """Stop every zygote; the pool starts new ones if used again."""
        for _ in range(self.workers):
            zygote = self._idle.get()
            if zygote is not None:
                zygote.kill()
        for _ in range(self.workers):
            self._idle.put(None)


_POOLS: weakref.WeakSet[SandboxPool] = weakref.WeakSet()
_SHARED: dict[str, SandboxPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(name: str, preload: Sequence[str] = ()) -> SandboxPool:
    """The process-wide pool called ``name`` (one per kind of job, so each preloads only what it needs)."""
    with _SHARED_LOCK:
        if name not in _SHARED:
            _SHARED[name] = SandboxPool(preload)
        return _SHARED[name]


def _after_fork_in_child() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # another thread may have held it at the fork
    for pool in list(_POOLS):
        pool._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_shared() -> None:
    for pool in _SHARED.values():
        pool.close()
