"""A Python interpreter the policy calls while it thinks (ToRL / ReTool style), for any task with a final answer.

The policy writes a program in a fenced block that opens with ```` ```python ```` (or ``py``, ``python3``); the turn
stops when the block closes, the program runs in the sandbox code rewards use (``rewards.sandbox``: its own
PID, mount and network namespaces, rlimits; ``timeout``, ``memory_mb``), and what it printed comes back inside the
policy's message, where the policy goes on::

    ```output
    <stdout and stderr as a terminal shows them, cut to max_output_chars>
    ```

Where the output is longer than ``max_output_chars``, its head and tail are kept around ``...[truncated]...`` (the
cap counts the mark). A run that failed ends with a line that says how: ``[timed out after T s]``, ``[killed by
SIGSEGV]`` (any signal), ``[stopped: printed more than N bytes]`` or ``[exit code N]`` (1 after the traceback of
an uncaught exception). Each is a failed call (``"error": True``, counted in the run's metrics) and only an
observation: the episode goes on. Each program starts afresh: nothing carries over between blocks. Only a
sandbox that cannot start at all raises, as a broken tool is not the policy's doing.

Where a turn stops. A stop string cannot tell the fence that closes a python block from a bare opening fence: both
are ```` ``` ```` then a newline. So ``stop`` is ``"```\\n"`` (an opening ```` ```python ```` never holds it) and
``step`` decides with the fences of the message so far: when the fence that stopped the turn closes a python block,
that block (the turn's last) runs; when it opens or closes any other block (a bare ```` ``` ```` block, the policy's
own ```` ```output ````), the stop was a false one and the turn resumes with an empty observation, the text so far
kept to read the next fences in context. A resumption costs one of ``rollout.max_turns`` and adds no token (its
entry in the turns is an empty tool turn). A turn that ends without the stop string ended the policy's message:
the episode is over, whatever the message holds (so a block closed by ```` ``` ```` right before the end of the
message does not run).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from typing import Any

from rewards.sandbox.pool import Job, Limits, Outcome, SandboxPool, shared_pool
from tasks.environments import Message, Observation, environment

CLOSE = "```\n"
PYTHON = ("python", "py", "python3")
TRUNCATED = "\n...[truncated]...\n"
PRELOAD = ("math", "fractions", "itertools", "functools", "collections", "numpy", "sympy")
SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step inside <think> </think> tags, then give only the final "
    "answer inside <answer> </answer> tags. While you think, you can run Python code: write a program in a block "
    "that opens with ```python and closes with ``` on a line of its own. It runs as soon as the block closes, and "
    "what it prints (stdout and stderr, cut when long) comes back right after the block, in a block that opens "
    "with ```output. Each program starts afresh (nothing carries over from an earlier block), has no network "
    "and is stopped after {timeout:g} s."
)
_FENCE = re.compile(r"```([^`\n]*)")
_PENDING = "python_tool_pending"
_SCRIPT = "rewards.sandbox.script:run_script"
_OUTPUT_BYTES = Limits().output_bytes


def closed_program(message: str) -> str | None:
    """The program of the python block that ``message``'s last fence closes; None when that fence opens a block or
    closes another kind of block."""
    language, start, program = None, 0, None
    for fence in _FENCE.finditer(message):
        if language is None:
            language, start, program = fence.group(1).strip().lower(), fence.end() + 1, None
        else:
            program = message[start : fence.start()] if language in PYTHON else None
            language = None
    return program if language is None else None


def cut(output: str, max_chars: int) -> str:
    """``output`` within ``max_chars``, mark included: its head and tail, where a traceback ends."""
    if len(output) <= max_chars:
        return output
    keep = max_chars - len(TRUNCATED)
    head, tail = keep - keep // 2, keep // 2
    return output[:head] + TRUNCATED + (output[-tail:] if tail else "")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _failure_note(outcome: Outcome, timeout_s: float, output_bytes: int) -> str | None:
    if outcome.status == "timeout":
        return f"[timed out after {timeout_s:g} s]"
    if outcome.status == "overflow":
        return f"[stopped: printed more than {output_bytes} bytes]"
    if outcome.status == "error":
        return "[the sandbox failed to run the program]"
    if outcome.exit_code is not None and outcome.exit_code < 0:
        return f"[killed by {_signal_name(-outcome.exit_code)}]"
    if outcome.exit_code:
        return f"[exit code {outcome.exit_code}]"
    return None


def tool_observation(outcome: Outcome, timeout_s: float, max_chars: int, output_bytes: int) -> dict[str, Any]:
    """The observation of one run (see the module docstring for its layout)."""
    output = cut(outcome.output.decode(errors="replace"), max_chars).rstrip("\n")
    lines = [line for line in (output, _failure_note(outcome, timeout_s, output_bytes)) if line]
    observation: dict[str, Any] = {"role": "tool", "content": "```output\n" + "\n".join(lines) + "\n```\n",
                                   "inline": True}
    if outcome.status != "ok" or outcome.exit_code != 0:
        observation["error"] = True
    return observation


@environment("python_tool")
class PythonTool:
    """Options: ``timeout`` (seconds per program), ``max_output_chars``, ``memory_mb`` (what a program may allocate),
    ``preload`` (modules each sandbox worker imports once, so programs get them without paying the import),
    ``system_prompt`` (replaces the row's system message; the default explains the tool)."""

    stop = (CLOSE,)

    def __init__(self, timeout: float = 5.0, max_output_chars: int = 1024, memory_mb: int = 1024,
                 preload: Sequence[str] = PRELOAD, system_prompt: str | None = None) -> None:
        if max_output_chars < 2 * len(TRUNCATED):
            raise ValueError(f"max_output_chars must be >= {2 * len(TRUNCATED)}, got {max_output_chars}")
        if timeout <= 0 or memory_mb <= 0:
            raise ValueError(f"timeout and memory_mb must be positive, got {timeout} and {memory_mb}")
        self.max_output_chars = max_output_chars
        self.output_bytes = max(_OUTPUT_BYTES, 4 * max_output_chars)  # output within the character cap never reaches it
        self.limits = Limits(timeout_s=float(timeout), memory_mb=memory_mb, output_bytes=self.output_bytes)
        self.preload = tuple(preload)
        self.system_prompt = SYSTEM_PROMPT.format(timeout=timeout) if system_prompt is None else system_prompt

    def pool(self) -> SandboxPool:
        return shared_pool(f"python_tool:{','.join(self.preload)}", preload=("rewards.sandbox.script", *self.preload))

    def reset(self, row: dict[str, Any]) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}, *(m for m in row["prompt"] if m["role"] != "system")]

    def _read(self, state: dict[str, Any], text: str) -> tuple[str | None, tuple[Observation | None, bool]]:
        """The program the turn calls, or None and the answer that needs no run (episode over, or resumed)."""
        message = state.pop(_PENDING, "")
        at = text.find(CLOSE)
        if at < 0:
            return None, (None, True)
        program = closed_program(message + text[: at + len(CLOSE) - 1])
        if program is None:
            state[_PENDING] = message + text
            return None, ("", False)
        return program, (None, False)

    def step(self, state: dict[str, Any], text: str) -> tuple[Observation | None, bool]:
        return self.step_batch([state], [text])[0]

    def step_batch(self, states: list[dict[str, Any]], texts: list[str]) -> list[tuple[Observation | None, bool]]:
        """Every program of the turn runs at once, as many in parallel as the sandbox pool has workers."""
        read = [self._read(state, text) for state, text in zip(states, texts, strict=True)]
        calls = [i for i, (program, _) in enumerate(read) if program is not None]
        outcomes = self.pool().map([Job(_SCRIPT, {"program": read[i][0]}, self.limits) for i in calls]) if calls else []
        answers = [answer for _, answer in read]
        for i, outcome in zip(calls, outcomes, strict=True):
            answers[i] = (tool_observation(outcome, self.limits.timeout_s, self.max_output_chars, self.output_bytes), False)
        return answers
