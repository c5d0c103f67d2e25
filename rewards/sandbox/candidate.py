"""The candidate's side of a code job: runs the model-written program, and nothing of the judge's.

The process this runs in is a sandbox job of its own (``rewards.sandbox.zygote``: own PID and mount namespaces,
rlimits, no network), forked before the judge's request (tests, the verdict nonce) was read by anyone it
descends from, so neither is anywhere in its memory. Its only link to the judge is ``channel``, a pair of
pipes carrying plain data (``rewards.sandbox.wire``); its stdout and stderr are kept for debugging only.

- ``serve``: runs the program once, says whether it ran, then answers calls by name with the function's
  return value and the new values of its list, dict, set and bytearray arguments (so in-place mutation is
  seen by the judge; identity of nested objects is not), or with the name of the built-in exception class
  the call raised (the nearest one in the exception's MRO).
- ``io_outputs``: runs the program once per input in a forked child with stdin fed from memory, and sends the
  captured stdout (None on crash, timeout or overflow). Expected outputs never enter the sandbox.
Nothing here is trusted: the program may rewrite all of it; the judge checks everything it receives.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from rewards.sandbox.wire import WireError, receive, send

PR_SET_DUMPABLE = 4
MUTABLE = (list, dict, set, bytearray)


def _flush() -> None:
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()


def builtin_name(exc: BaseException) -> str:
    """The first built-in exception class in ``exc``'s MRO, by name."""
    return next(c.__name__ for c in type(exc).__mro__ if c.__module__ == "builtins")


def _answer(namespace: dict[str, Any], call: Any) -> dict[str, Any]:
    name, args, kwargs = call["name"], call["args"], call["kwargs"]
    function = namespace.get(name)
    if not callable(function):
        return {"raised": "NameError"}
    try:
        value = function(*args, **kwargs)
    except BaseException as exc:
        return {"raised": builtin_name(exc)}
    mutated = [[key, arg] for key, arg in [*enumerate(args), *kwargs.items()] if type(arg) in MUTABLE]
    return {"value": value, "mutated": mutated}


def serve(program: str, channel: tuple[int, int]) -> None:
    """Run ``program``, then answer the judge's calls until it closes the channel."""
    calls, replies = channel
    namespace: dict[str, Any] = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(program, "<program>", "exec"), namespace)
    except BaseException as exc:
        _flush()
        send(replies, {"ready": False, "raised": builtin_name(exc)})
        return
    _flush()
    send(replies, {"ready": True})
    while True:
        try:
            call = receive(calls)
        except EOFError:
            return
        reply = _answer(namespace, call)
        _flush()
        try:
            send(replies, reply)
        except WireError as exc:
            send(replies, {"unplain": str(exc)})


# ---------------------------------------------------------------- stdin/stdout programs

def _run_main(code: Any) -> int:
    """The child's side of one io case: run the program as __main__, flush, report success as exit status."""
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        status = 0
    except SystemExit as exit_:
        value = exit_.code  # compared without calling any method an untrusted object could override
        status = 0 if value is None or (type(value) is int and int.__eq__(value, 0)) else 1
    except BaseException:
        status = 1
    try:
        sys.stdout.flush()
    except BaseException:
        status = 1
    return status


def _read_until(fd: int, deadline: float, cap: int) -> bytes | None:
    chunks, size = [], 0
    while (remaining := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            break
    return None


def _run_case(code: Any, stdin: str, timeout_s: float, output_bytes: int) -> str | None:
    stdin_fd = os.memfd_create("stdin")
    os.write(stdin_fd, stdin.encode())
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        os.closerange(3, 65536)  # the channel to the judge is not the case's to write on
        os._exit(_run_main(code))
    os.close(stdin_fd)
    os.close(out_w)
    output = _read_until(out_r, time.monotonic() + timeout_s, output_bytes)
    os.close(out_r)
    with contextlib.suppress(ProcessLookupError):  # as PID-namespace init, kill(-1) reaches all the case left
        os.kill(-1, signal.SIGKILL) if os.getpid() == 1 else os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if output is None or os.waitstatus_to_exitcode(status) != 0:
        return None
    return output.decode(errors="replace")


def io_outputs(program: str, inputs: Sequence[str], case_timeout_s: float, output_bytes: int,
               channel: tuple[int, int]) -> None:
    """Send the program's stdout for each input, or None where it crashed, timed out or printed too much."""
    try:
        code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError):
        return
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # cases cannot ptrace or read this process's memory
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nor interrupt it (init only gets signals it handles)
    for text in inputs:
        send(channel[1], _run_case(code, text, case_timeout_s, output_bytes))
