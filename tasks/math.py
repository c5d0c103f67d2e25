"""Procedural math: unlimited problems with exact answers; worked solutions where the generator has them."""

from __future__ import annotations

import random
from typing import Any

from datasets import Dataset

from tasks.gsm8k import parse_gsm8k_answer
from tasks.gym import gym_entries
from tasks.prompts import chat, worked_solution
from tasks.registry import task
from tasks.sources import split_of


def addition_trace(a: int, b: int) -> str:
    """Column addition, right to left, carries written out: the reasoning the cold start teaches."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps, carry, result = [], 0, []
    for i in range(max(len(digits_a), len(digits_b))):
        da = int(digits_a[i]) if i < len(digits_a) else 0
        db = int(digits_b[i]) if i < len(digits_b) else 0
        total = da + db + carry
        step = f"{da}+{db}" + (f"+{carry}" if carry else "") + f"={total}"
        carry, digit = divmod(total, 10)
        result.append(str(digit))
        steps.append(step + (f", write {digit} carry {carry}" if carry else ""))
    if carry:
        result.append(str(carry))
    return "; ".join(steps) + f". So {a}+{b}={''.join(reversed(result))}."


def solve(a: int, op: str, b: int) -> tuple[int, str]:
    """The exact answer and a worked trace for one problem."""
    if op == "+":
        return a + b, addition_trace(a, b)
    if op == "-":
        return a - b, f"{a}-{b}={a - b}."
    if op == "*":
        return a * b, f"{a}*{b}={a * b}."
    raise ValueError(f"unsupported operator {op!r}; use '+', '-' or '*'")


@task("arithmetic", rewards=("math_accuracy",))
def arithmetic(split: str, size: int, seed: int = 0, digits: int = 2, ops: str = "+") -> Dataset:
    """``size`` problems ``a op b`` with ``digits``-digit operands from ``split``.

    Difficulty knobs: ``digits`` (operand length) and ``ops`` (any of ``+-*``).
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    rng = random.Random(f"arithmetic-{split}-{seed}-{digits}-{ops}")
    space = (high - low + 1) ** 2 * len(set(ops))
    rows, drawn = [], set()
    while len(rows) < size:
        if len(drawn) == space:
            raise ValueError(
                f"the {split} split has fewer than {size} distinct {digits}-digit {ops!r} problems"
            )
        a, b, op = rng.randint(low, high), rng.randint(low, high), rng.choice(ops)
        if (a, op, b) in drawn:
            continue
        drawn.add((a, op, b))
        if split_of(f"{a}{op}{b}") != split:
            continue
        answer, trace = solve(a, op, b)
        rows.append(
            {
                "prompt": chat(f"What is {a} {op} {b}?"),
                "answer": str(answer),
                "solution": worked_solution(trace, str(answer)),
                "task": "arithmetic",
            }
        )
    return Dataset.from_list(rows)


@task("gsm_symbolic", rewards=("math_accuracy",))
def gsm_symbolic(split: str, size: int, seed: int = 0, **options: Any) -> Dataset:
    """GSM8K-style word problems with randomised numbers (reasoning-gym); options set its config (``difficulty``)."""
    rows = []
    for entry in gym_entries("gsm_symbolic", split, size, seed, options):
        reasoning, _ = parse_gsm8k_answer(entry["metadata"]["answer_cot"])
        rows.append(
            {
                "prompt": chat(entry["question"]),
                "answer": entry["answer"],
                "solution": worked_solution(reasoning, entry["answer"]),
                "task": "gsm_symbolic",
            }
        )
    return Dataset.from_list(rows)


@task("basic_arithmetic", rewards=("math_accuracy",))
def basic_arithmetic(split: str, size: int, seed: int = 0, **options: Any) -> Dataset:
    """Multi-term integer expressions (reasoning-gym); options set its config (``min_terms``, ``max_digits``...)."""
    entries = gym_entries("basic_arithmetic", split, size, seed, options)
    return Dataset.from_list(
        [{"prompt": chat(e["question"]), "answer": e["answer"], "task": "basic_arithmetic"} for e in entries]
    )
