r"""Math answer correctness: the completion's final answer is equivalent to ``sample["answer"]``.

Applies to rows with an ``answer`` (a string: "68", "\frac{1}{2}", "[1, 2)", ...) that are not reasoning-gym
rows (rewards.logic scores those); returns None elsewhere.

Decision path, cheapest first:
1. The final answer under the rewards.extract policy (outside <think>, one answer block, one distinct box,
   ASCII digits). None, longer than MAX_ANSWER_CHARS, or hedged ("3 or 4" when the gold has no "or"): 0.
2. Both sides are normalised (``normalise``: ``\$`` is a currency sign, ``1\,000`` and ``1 000`` are 1000).
   Plain integers, decimals and fractions on both sides then compare exactly in-process, so the arithmetic task
   never pays for a process round-trip. When the gold is a plain number, an answer that is a formula with
   arithmetic left in it (``572 * 655``, ``x = 2^{10}``) scores 0: it equals the gold symbolically, but it is the
   question restated, and a policy trained on such a reward learns to copy the question into its answer.
3. Anything else goes to math-verify (sympy) in a sandboxed worker: LaTeX, percentages (``10\%`` equals 10
   and 0.1), sets and intervals, symbolic equality. math-verify's own timeouts rely on SIGALRM and have let
   towers of powers and nested logs hang or exhaust memory, so the worker is killed at a hard deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from rewards.extract import final_answer, is_hedged
from rewards.logic import is_reasoning_gym_row
from rewards.registry import reward
from rewards.sandbox.pool import Job, Limits, SandboxPool, shared_pool

MAX_ANSWER_CHARS = 1000
LIMITS = Limits(timeout_s=5.0, memory_mb=1024, processes=4, output_bytes=1 << 16)
PARSE_TIMEOUT_S = 2  # math-verify's own (soft) timeouts, inside the hard deadline of LIMITS
VERIFY_TIMEOUT_S = 2
_DIGIT_GROUP = re.compile(r"(?<=[0-9])(?: |\\,|\\ |~|\{,\})(?=[0-9]{3}(?![0-9]))", re.ASCII)
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]{1,100}(?:\.[0-9]{1,100})?(?:/[0-9]{1,100})?", re.ASCII)
_ARITHMETIC = re.compile(r"[0-9)}]\s*(?:[-+*^×÷·]|\\times|\\cdot|\\div)\s*[-+]?[0-9({\\]")
"""An operator between two operands: arithmetic still to be done ("572 * 655", "2^{10}", "3 \\times 4"; a fraction
"1/3" is a number)."""
_ASSIGNED = re.compile(r"^\s*\$?\s*[A-Za-z]\w*\s*=")  # "x = ...": the formula is what follows


def leaves_arithmetic(answer: str) -> bool:
    """``answer`` is a formula alone (no words but LaTeX commands, after a leading ``x =``) with an operator left in
    it. Free text goes to math-verify, which reads its last formula."""
    formula = _ASSIGNED.sub("", answer)
    return not re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", formula)) and bool(_ARITHMETIC.search(formula))


def extract_answer(text: str) -> str | None:
    """The completion's final answer as a string (also what majority voting in eval compares)."""
    return final_answer(text)


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number when it is a plain integer, decimal or fraction, else None."""
    text = text.strip().strip("$").strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except ZeroDivisionError:
        return None


def _as_latex(gold: str) -> str:
    return gold if "$" in gold or "\\boxed" in gold else f"\\boxed{{{gold}}}"


def verify_job(gold: str, answer: str) -> Iterator[bool]:
    """Sandbox job: is ``answer`` equivalent to ``gold`` according to math-verify?"""
    from math_verify import parse, verify

    expected = parse(_as_latex(gold), parsing_timeout=PARSE_TIMEOUT_S)
    wrapped = answer if "$" in answer else f"${answer}$"
    predicted = parse(wrapped, parsing_timeout=PARSE_TIMEOUT_S) or parse(answer, parsing_timeout=PARSE_TIMEOUT_S)
    yield bool(expected and predicted and verify(expected, predicted, timeout_seconds=VERIFY_TIMEOUT_S))


def warm_up() -> None:
    """Run math-verify once in the zygote: its first call builds the LaTeX parser, which every job would
    otherwise build again."""
    for gold, answer in (("0.5", "\\frac{1}{2}"), ("[1,2)", "x^2+1")):
        list(verify_job(gold, answer))


def normalise(text: str) -> str:
    r"""``text`` without ``\$`` and with digit groups joined (``1 000``, ``1\,000``, ``14{,}916``).

    An escaped dollar is a currency sign, so ``\$18.90`` is 18.90 (read as a math delimiter it would leave ``\``
    and open a formula that never closes). Only groups of exactly three digits are joined: ``12 34`` stays two
    numbers, and a comma is never a decimal point (``1,234`` is 1234).
    """
    return _DIGIT_GROUP.sub("", text.replace("\\$", ""))


def _quick_score(answer: str | None, gold: str) -> float | Job:
    """A score decided without math-verify, or the sandbox job that decides it."""
    gold = normalise(gold)
    answer = None if answer is None else normalise(answer)
    if answer is None or len(answer) > MAX_ANSWER_CHARS or (is_hedged(answer) and not is_hedged(gold)):
        return 0.0
    predicted, expected = parse_number(answer), parse_number(gold)
    if predicted is not None and expected is not None:
        return float(predicted == expected)
    if expected is not None and leaves_arithmetic(answer):
        return 0.0  # a number is answered by a number: the question's own arithmetic, restated, equals it too
    return Job("rewards.math:verify_job", {"gold": gold, "answer": answer}, LIMITS)


def math_pool() -> SandboxPool:
    return shared_pool("math", preload=("rewards.math:warm_up",))


def score_answers(answers: list[str | None], golds: list[str], pool: SandboxPool | None = None) -> list[float]:
    """1.0 where the answer is equivalent to its gold, else 0.0; sandbox jobs for all rows run in parallel."""
    decisions = [_quick_score(a, g) for a, g in zip(answers, golds, strict=True)]
    jobs = [d for d in decisions if isinstance(d, Job)]
    outcomes = iter((pool or math_pool()).map(jobs) if jobs else [])
    scores = []
    for decision in decisions:
        if isinstance(decision, Job):
            decision = float(next(outcomes).results[:1] == [True])
        scores.append(decision)
    return scores


def _applies(sample: dict[str, Any]) -> bool:
    return sample.get("answer") is not None and not is_reasoning_gym_row(sample)


@reward("math_accuracy", fields=("answer",))
def math_accuracy(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the final answer is equivalent to ``sample['answer']``; None for rows without one."""
    rows = [i for i, sample in enumerate(samples) if _applies(sample)]
    scores = score_answers([extract_answer(completions[i]) for i in rows], [str(samples[i]["answer"]) for i in rows])
    result: list[float | None] = [None] * len(completions)
    for i, score in zip(rows, scores, strict=True):
        result[i] = score
    return result
