"""A model-written program run as a script, for a tool whose caller reads what it printed, not a verdict.

Code rewards never trust a program's output, so they pair it with a judge (``rewards.sandbox.harness``). A code
interpreter offered to the policy is the opposite case: its output is only shown back to the policy, so the program
runs alone as a plain sandbox job (same isolation and limits), with stdout and stderr both on the job's output
pipe, in the order they were written (stdout is line-buffered for that). The pool's ``Outcome`` then carries
everything the caller needs: ``output`` (what a terminal would show, a traceback included), ``status`` (the
deadline or the output cap stopped it) and ``exit_code`` (0, the program's ``sys.exit`` code, 1 after an
uncaught exception, or minus the signal that killed it).
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import os
import sys
import traceback
from typing import NoReturn

FILENAME = "<program>"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def _exit_status(exit_: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(code)``: the code, or 1 after printing it."""
    code = exit_.code
    if code is None:
        return 0
    if type(code) is int:
        return code & 0xFF
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def run_script(program: str) -> NoReturn:
    """Run ``program`` as ``__main__`` and exit with its status; never returns (the job yields no result)."""
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)
    linecache.cache[FILENAME] = (len(program), None, program.splitlines(True), FILENAME)  # source in tracebacks
    try:
        exec(compile(program, FILENAME, "exec"), {"__name__": "__main__", "__builtins__": builtins})
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_)
    except BaseException as exc:
        _flush()
        frames = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # this module's frame left out
        with contextlib.suppress(BaseException):
            traceback.print_exception(type(exc), exc, frames)
        status = 1
    _flush()
    os._exit(status)
