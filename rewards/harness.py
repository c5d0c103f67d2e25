"""Runs inside a sandbox job: executes a model-written program against its tests, one verdict per test.

- ``function_tests``: test programs (assert statements, or a HumanEval ``check`` followed by
  ``check(entry_point)``), each run in the job process after the program, in its own copy of the program's
  namespace; yields True/False per test.
- ``io_tests``: the program runs once per input in a forked child with stdin fed from memory; yields the
  captured stdout (None on crash, timeout or overflow). The parent compares it with the expected output,
  which never enters the sandbox.

Defences against programs written to pass rather than to be right (each a reward hack seen in RL runs):
- every value a test compares, negates or asserts on must be plain data (exact built-in types, recursively),
  so an object whose ``__eq__`` always returns True fails the test instead of passing it;
- builtins and the attributes of modules loaded before the program are restored before the tests run, and
  tracing hooks are cleared, so replacing ``abs`` or ``math.isclose`` does not change what tests compute;
- tests run after the program, so a program defining its own ``check`` is overridden;
- any exception in a test (SystemExit, SkipTest, KeyboardInterrupt...) fails that test; a program that exits
  or crashes before the tests run yields nothing, which scores 0; no test framework is involved, so a
  ``conftest.py`` or a patched runner has nothing to act on.
What remains: function tests run in-process with the program, so code that deliberately walks the harness's
frames could still forge verdicts. The sandbox keeps such code away from everything else.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

GUARD = "__rlreason_plain__"
PR_SET_DUMPABLE = 4
_SCALARS = (int, float, complex, str, bytes, bytearray, bool, type(None), type, range)
_CONTAINERS = (list, tuple, set, frozenset)


def _plain_guard() -> Callable[[Any], Any]:
    """``guard(v)`` returns ``v`` when it is plain data, else raises; built from references taken now."""
    type_of, id_of, extend = type, id, list.extend
    scalar_ids = {id(t) for t in _SCALARS}
    container_ids = {id(t) for t in _CONTAINERS}
    dict_keys, dict_values = dict.keys, dict.values

    def guard(value: Any) -> Any:
        stack, seen = [value], set()
        while stack:
            item = stack.pop()
            kind = id_of(type_of(item))
            if kind in scalar_ids or id_of(item) in seen:
                continue
            seen.add(id_of(item))
            if kind == id_of(dict):
                extend(stack, dict_keys(item))
                extend(stack, dict_values(item))
            elif kind in container_ids:
                extend(stack, item)
            else:
                raise TypeError(f"a test compared a {type_of(item).__name__}, which is not plain data")
        return value

    return guard


class _Guard(ast.NodeTransformer):
    """Route every compared, negated, asserted or branched-on value through the plain-data guard."""

    @staticmethod
    def _wrap(node: ast.expr) -> ast.expr:
        return ast.Call(func=ast.Name(GUARD, ast.Load()), args=[node], keywords=[])

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        self.generic_visit(node)
        if not all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):  # identity cannot be faked
            node.left = self._wrap(node.left)
            node.comparators = [self._wrap(c) for c in node.comparators]
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.UnaryOp:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            node.operand = self._wrap(node.operand)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.BoolOp:
        self.generic_visit(node)
        node.values = [self._wrap(v) for v in node.values]
        return node

    def _wrap_test(self, node: ast.Assert | ast.If | ast.While | ast.IfExp) -> Any:
        self.generic_visit(node)
        node.test = self._wrap(node.test)
        return node

    visit_Assert = visit_If = visit_While = visit_IfExp = _wrap_test


def guarded(source: str, name: str) -> Any:
    """Compile test code with the plain-data guard applied."""
    tree = ast.fix_missing_locations(_Guard().visit(ast.parse(source)))
    return compile(tree, name, "exec")


def _snapshot_modules() -> Callable[[], None]:
    """Remember builtins, sys.modules and every loaded module's attributes; the result puts them back."""
    modules = dict(sys.modules)
    attributes = [(vars(m), dict(vars(m))) for m in modules.values() if hasattr(m, "__dict__")]
    settrace, setprofile, module_table = sys.settrace, sys.setprofile, sys.modules

    def restore() -> None:
        settrace(None)
        setprofile(None)
        module_table.update(modules)
        for namespace, saved in attributes:
            for key, value in saved.items():
                if namespace.get(key) is not value:
                    namespace[key] = value

    return restore


def _passes(run: Callable[[], Any]) -> bool:
    try:
        run()
    except BaseException:
        return False
    return True


def function_tests(program: str, tests: Sequence[str]) -> Iterator[bool]:
    """One verdict per test program (asserts, or a HumanEval ``check`` plus the call ``check(entry_point)``).

    Everything the test loop uses is bound to locals before the program runs: the program's functions run
    during the tests and could otherwise patch this module's globals between one test and the next.
    """
    exec_, passes, guard, guard_name, restore = exec, _passes, _plain_guard(), GUARD, _snapshot_modules()
    compiled = [guarded(test, f"<test {i}>") for i, test in enumerate(tests)]
    pristine = {**vars(builtins)}
    namespace: dict[str, Any] = {"__name__": "__candidate__", "__builtins__": builtins}
    if not passes(lambda: exec_(compile(program, "<program>", "exec"), namespace)):
        return
    for test in compiled:
        restore()
        env = {**namespace, "__builtins__": {**pristine}, guard_name: guard}
        yield passes(lambda test=test, env=env: exec_(test, env))


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
        os.closerange(3, 65536)  # nothing of the harness's (results pipe included) stays reachable
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


def io_tests(program: str, inputs: Sequence[str], case_timeout_s: float, output_bytes: int) -> Iterator[str | None]:
    """The program's stdout for each input, or None where it crashed, timed out or printed too much."""
    try:
        code = compile(program, "<program>", "exec")
    except (SyntaxError, ValueError):
        return
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # cases cannot ptrace or read the harness's memory
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # nor interrupt it (init only gets signals it handles)
    for text in inputs:
        yield _run_case(code, text, case_timeout_s, output_bytes)
