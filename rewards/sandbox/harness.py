"""The judge's side of a code job: runs a row's tests and decides each verdict; never runs model-written code.

A code job is two sandbox processes (``rewards.sandbox.zygote``): the candidate (``rewards.sandbox.candidate``), which runs
the program, and this judge, which holds the tests and the verdict channel (its stdout, nonce-framed). The
candidate is forked before the judge's request reaches any process it descends from, so it never sees the
tests, their expected values or the nonce, and it shares no memory, files or PID namespace with the judge.
They talk over a pair of pipes in plain data only (``rewards.sandbox.wire``: exact built-in types, size and depth caps).

- ``function_tests``: each test program (assert statements, or a HumanEval ``check`` followed by
  ``check(entry_point)``) runs here, in a fresh namespace holding only what the test defines and imports.
  A name the test uses but does not define is the builtin of that name if there is one (even where the
  program defines its own ``abs``), else the standard-library module of that name (a test may use ``math``
  that only the program imported), else a proxy: calling it calls the program's function of that name in
  the candidate, with plain-data arguments, and returns its plain-data result.
  HumanEval's ``check(candidate)`` thus receives the proxy. A candidate function that raises an Exception
  makes the proxy raise the nearest built-in exception class (``assertRaises``-style tests work; the message
  is not kept); SystemExit and the like, a dead candidate, or an answer that is not plain data raise
  CandidateError, which no ``except Exception`` catches. A function that mutates a list, dict, set or bytearray
  argument has the new contents written back into the caller's object (nested objects are replaced, not
  updated in place; other side effects are not seen). Yields True/False per test.
- ``io_relay``: the candidate runs the program once per input and sends each captured stdout; this relays
  them (str or None) to the trainer, which compares them with the expected outputs it alone holds.

Defences against programs written to pass rather than to be right (each a reward hack seen in RL runs):
- verdicts come only from this process, which the candidate cannot reach: frame or ``gc`` walks, patched
  builtins, modules or harness functions, tracing hooks and forged output lines all act on the candidate's
  own process, where there is no verdict to change;
- only plain data crosses, so an object whose ``__eq__`` always returns True never reaches a comparison, and
  every value a test compares, negates or asserts on is still checked to be plain data; a result that is
  not plain data fails its test whatever the test catches;
- the tests use their own helpers: the program's ``check`` or ``abs`` are never called by the judge;
- any exception in a test (SystemExit, SkipTest...) fails that test; a program that exits or crashes before
  it says it ran yields nothing, which scores 0; no test framework is involved, so a ``conftest.py`` or a
  patched runner has nothing to act on.
What is not covered: tests that need the program's objects other than plain data (instances of classes it
defines, generators, functions passed back) fail, as they cannot cross; a program may still read a row's
tests from its prompt; a test that calls a helper the task defines must carry that helper's source itself
(``tasks.code`` puts HumanEval prompts' helpers, e.g. HumanEval/32's ``poly``, into the test), else it calls
the program's function of that name.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rewards.sandbox.candidate import MUTABLE
from rewards.sandbox.wire import WireError, receive, send

GUARD = "__rlreason_plain__"
_SCALARS = (int, float, complex, str, bytes, bytearray, bool, type(None), type, range)
_CONTAINERS = (list, tuple, set, frozenset)


class CandidateError(BaseException):
    """The candidate is gone, exited, or answered out of protocol or with something that is not plain data.

    A BaseException, so that it fails the test even under ``except Exception``, as the same happening in the
    test's own process would.
    """


def _plain_guard() -> Callable[[Any], Any]:
    """``guard(v)`` returns ``v`` when it is plain data, else raises."""
    scalar_ids = {id(t) for t in _SCALARS}
    container_ids = {id(t) for t in _CONTAINERS}

    def guard(value: Any) -> Any:
        stack, seen = [value], set()
        while stack:
            item = stack.pop()
            kind = id(type(item))
            if kind in scalar_ids or id(item) in seen:
                continue
            seen.add(id(item))
            if kind == id(dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif kind in container_ids:
                stack.extend(item)
            else:
                raise TypeError(f"a test compared a {type(item).__name__}, which is not plain data")
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


def free_names(source: str) -> set[str]:
    """Names ``source`` reads but never binds (by assignment, def, class, import, parameter or except)."""
    tree = ast.parse(source)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


class _Candidate:
    """The judge's end of the channel to the candidate process."""

    def __init__(self, channel: tuple[int, int]) -> None:
        self.replies, self.calls = channel
        self.gone = False

    def receive(self) -> dict[str, Any]:
        try:
            message = receive(self.replies)
        except (EOFError, WireError) as exc:
            self.gone = True
            raise CandidateError(f"the candidate stopped answering: {exc}") from exc
        if type(message) is not dict:
            self.gone = True
            raise CandidateError("the candidate answered out of protocol")
        return message

    def ready(self) -> bool:
        try:
            return self.receive().get("ready") is True
        except CandidateError:
            return False

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.gone:
            raise CandidateError("the candidate is gone")
        send(self.calls, {"name": name, "args": list(args), "kwargs": kwargs})
        reply = self.receive()
        if "raised" in reply:
            raise _exception(reply["raised"])
        if "value" not in reply or type(reply.get("mutated")) is not list:
            raise CandidateError(str(reply.get("unplain", "an answer out of protocol")))
        _write_back(args, kwargs, reply["mutated"])
        return reply["value"]


def _exception(name: Any) -> BaseException:
    found = getattr(builtins, name, None) if type(name) is str else None
    if isinstance(found, type) and issubclass(found, Exception):
        return found(f"raised in the candidate: {name}")
    return CandidateError(f"the candidate raised {name!r}")


def _write_back(args: tuple[Any, ...], kwargs: dict[str, Any], mutated: list[Any]) -> None:
    """Put the candidate's post-call contents of mutable arguments into the judge's own objects."""
    for item in mutated:
        key, new = item if type(item) is list and len(item) == 2 else (None, None)
        old = (args[key] if type(key) is int and 0 <= key < len(args)
               else kwargs.get(key) if type(key) is str else None)
        if type(old) not in MUTABLE or type(new) is not type(old):
            raise CandidateError("mutated arguments out of protocol")
        if type(old) is list or type(old) is bytearray:
            old[:] = new
        else:
            old.clear()
            old.update(new)


def _proxy(candidate: _Candidate, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return candidate.call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _resolve(candidate: _Candidate, name: str) -> Any:
    if name in sys.stdlib_module_names:
        return importlib.import_module(name)
    return _proxy(candidate, name)


def _passes(code: Any, env: dict[str, Any]) -> bool:
    try:
        exec(code, env)
    except BaseException:
        return False
    return True


def function_tests(tests: Sequence[str], channel: tuple[int, int]) -> Iterator[bool]:
    """One verdict per test program, once the candidate says its program ran."""
    compiled = [(guarded(test, f"<test {i}>"), free_names(test)) for i, test in enumerate(tests)]
    candidate = _Candidate(channel)
    if not candidate.ready():
        return
    guard = _plain_guard()
    for code, names in compiled:
        env = {"__builtins__": builtins, GUARD: guard, **{n: _resolve(candidate, n) for n in names}}
        yield _passes(code, env)


def io_relay(cases: int, channel: tuple[int, int]) -> Iterator[str | None]:
    """The candidate's stdout for each of ``cases`` inputs (None where it was not a string)."""
    for _ in range(cases):
        try:
            output = receive(channel[0])
        except (EOFError, WireError):
            return
        yield output if type(output) is str else None
