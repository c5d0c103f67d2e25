"""Code rewards: run the program in a completion against the sample's tests, in the sandbox.

Sample fields (a row with neither ``tests`` nor ``io_tests`` scores None):
- ``tests``: str or list[str]. Each string is one test: Python code that raises when the program is wrong.
  Asserts (``"assert add(1, 2) == 3"``), or a HumanEval ``check`` definition followed by
  ``check(<entry_point>)``. Tests run in a judge process that never runs the program: a name a test uses
  without defining it calls the program's function of that name in its own sandboxed process, with plain
  data both ways (``rewards.sandbox.harness`` says what that allows and what not). A single string is a single
  test; a list gives a pass-rate signal per test. Within one dataset, use one type for every row (Arrow
  columns have one type).
- ``io_tests``: list of ``{"input": str, "output": str}``: the program reads stdin and must print the output;
  compared line by line, surrounding whitespace and trailing blank lines ignored. Each case is one test.
- ``timeout``: float, optional: seconds for the program plus all its ``tests``, and for each io case
  (default DEFAULT_TIMEOUT_S).

The program is the last fenced code block (```python, ```py or bare ```) of the answer region (the single
<answer> block, or the text after </think>; rewards.extract); without a fence, the <answer> block's content
is the program; otherwise there is no program and the score is 0.

Rewards: ``code_tests`` (fraction of the row's tests passed) and ``code_tests_all`` (1.0 only if all passed).
``tests`` and ``io_tests`` of one completion are two sandbox jobs (each a judge and a candidate process); the
jobs of a batch run in parallel, within the batch deadline the scorer sets (rewards.sandbox.pool): a completion
whose job is killed at the deadline, or never started, keeps what its tests had passed by then.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.extract import answer_region
from rewards.registry import reward
from rewards.sandbox.pool import Candidate, Job, Limits, Outcome, SandboxPool, shared_pool

DEFAULT_TIMEOUT_S = 10.0
OUTPUT_BYTES = 1 << 20
# modules a test or program is likely to import, imported once in the zygote instead of in every job
PRELOAD = ("rewards.sandbox.harness", "rewards.sandbox.candidate", "math", "re", "collections", "itertools", "functools", "heapq",
           "bisect", "string", "random", "copy", "fractions", "decimal", "statistics", "typing", "json", "unittest")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def code_pool() -> SandboxPool:
    return shared_pool("code", preload=PRELOAD)


def extract_program(text: str) -> str | None:
    """The program in a completion, or None (see the module docstring for where it is looked for)."""
    region, tagged = answer_region(text)
    if region is None:
        return None
    blocks = _FENCE.findall(region)
    if blocks:
        return blocks[-1]
    return (region.strip() or None) if tagged else None


def _normalise_output(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _test_programs(sample: dict[str, Any]) -> list[str]:
    tests = sample.get("tests") or []
    return [tests] if isinstance(tests, str) else list(tests)


def count_tests(sample: dict[str, Any]) -> int:
    """How many tests a row carries: each test program and each io case."""
    return len(_test_programs(sample)) + len(sample.get("io_tests") or ())


def function_tests_job(program: str, tests: list[str], limits: Limits | None = None) -> Job:
    """The sandbox job that runs ``tests`` in a judge against ``program`` in its candidate process."""
    return Job("rewards.sandbox.harness:function_tests", {"tests": tests}, limits or Limits(),
               Candidate("rewards.sandbox.candidate:serve", {"program": program}))


def _jobs(program: str, sample: dict[str, Any]) -> list[Job]:
    timeout = float(sample.get("timeout") or DEFAULT_TIMEOUT_S)
    jobs = []
    if _test_programs(sample):
        jobs.append(function_tests_job(program, _test_programs(sample), Limits(timeout_s=timeout)))
    cases = sample.get("io_tests") or ()
    if cases:
        args = {"program": program, "inputs": [case["input"] for case in cases], "case_timeout_s": timeout,
                "output_bytes": OUTPUT_BYTES}
        limits = Limits(timeout_s=timeout * len(cases) + 1, output_bytes=OUTPUT_BYTES * (len(cases) + 1))
        jobs.append(Job("rewards.sandbox.harness:io_relay", {"cases": len(cases)}, limits,
                        Candidate("rewards.sandbox.candidate:io_outputs", args)))
    return jobs


def _passed(sample: dict[str, Any], outcomes: list[Outcome]) -> int:
    """Tests passed, from what the parent trusts: the judge's nonce-framed verdicts, and outputs compared here."""
    passed, outcomes = 0, iter(outcomes)
    if _test_programs(sample):
        passed += sum(result is True for result in next(outcomes).results[:len(_test_programs(sample))])
    cases = sample.get("io_tests") or ()
    if cases:
        outputs = next(outcomes).results[:len(cases)]
        passed += sum(isinstance(out, str) and _normalise_output(out) == _normalise_output(case["output"])
                      for out, case in zip(outputs, cases, strict=False))
    return passed


def pass_fractions(completions: list[str], samples: list[dict[str, Any]],
                   pool: SandboxPool | None = None) -> list[float | None]:
    """Fraction of each row's tests the completion's program passes; None for rows without tests."""
    rows = []
    for text, sample in zip(completions, samples, strict=True):
        total = count_tests(sample)
        program = extract_program(text) if total else None
        rows.append((sample, total, _jobs(program, sample) if program is not None else []))
    outcomes = iter((pool or code_pool()).map([job for _, _, jobs in rows for job in jobs]))
    fractions: list[float | None] = []
    for sample, total, jobs in rows:
        mine = [next(outcomes) for _ in jobs]
        fractions.append(None if not total else _passed(sample, mine) / total if jobs else 0.0)
    return fractions


@reward("code_tests")
def code_tests(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """Fraction of the row's tests passed."""
    return pass_fractions(completions, samples)


@reward("code_tests_all")
def code_tests_all(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when every test of the row passed, else 0.0."""
    return [None if f is None else float(f == 1.0) for f in pass_fractions(completions, samples)]
