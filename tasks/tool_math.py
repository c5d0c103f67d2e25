"""Multiplication of multi-digit numbers: hard for a small model in its head, one line of Python with a tool.

Each row has two cold-start targets. ``solution`` works the product out by hand (partial products), for a run
without a tool. ``tool_solution`` is the same answer reached through the ``python_tool`` environment: the
policy's message in segments, an ``inline`` tool segment between them, in the layout that environment reads and
writes (a ```` ```python ```` block closed by ```` ``` ```` and a newline, its stop string, then the
```` ```output ```` block it answers with). ``rlreason traces --env python_tool`` checks every segment against
the environment before writing it, so a trace never shows an output the tool would not give.
"""

from __future__ import annotations

import random

from datasets import Dataset

from tasks.prompts import chat, worked_solution
from tasks.registry import task
from tasks.sources import split_of

TASK = "multiplication"


def partial_products(a: int, b: int) -> str:
    """Long multiplication by the digits of ``b``, each place value written out: the no-tool trace."""
    places = [(int(d) * 10**i) for i, d in enumerate(reversed(str(b))) if d != "0"][::-1]
    terms = " + ".join(f"{a}*{p}" for p in places)
    products = " + ".join(str(a * p) for p in places)
    return f"{a}*{b} = {terms} = {products} = {a * b}."


def tool_segments(a: int, b: int) -> list[dict[str, str | bool]]:
    """The policy's message around one program run: its call, the tool's output block, the answer read off it.

    Every segment carries ``inline`` (False on the policy's), so a dataset column holds one type.
    """
    product = str(a * b)
    return [
        {"role": "assistant", "content": f"<think>\nI compute it with Python.\n```python\nprint({a} * {b})\n```\n",
         "inline": False},
        {"role": "tool", "content": f"```output\n{product}\n```\n", "inline": True},
        {"role": "assistant", "content": f"So {a} * {b} = {product}.\n</think>\n<answer>{product}</answer>",
         "inline": False},
    ]


@task(TASK, rewards=("math_accuracy",))
def multiplication(split: str, size: int, seed: int = 0, digits: int = 3) -> Dataset:
    """``size`` products ``a * b`` of two ``digits``-digit numbers from ``split`` (the difficulty knob: ``digits``)."""
    if digits < 2:
        raise ValueError(f"digits must be >= 2, got {digits}")
    low, high = 10 ** (digits - 1), 10**digits - 1
    rng = random.Random(f"{TASK}-{split}-{seed}-{digits}")
    rows, drawn = [], set()
    while len(rows) < size:
        if len(drawn) == (high - low + 1) ** 2:
            raise ValueError(f"the {split} split has fewer than {size} distinct {digits}-digit products")
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) in drawn:
            continue
        drawn.add((a, b))
        if split_of(f"{TASK}-{a}*{b}") != split:
            continue
        rows.append(
            {
                "prompt": chat(f"What is {a} * {b}?"),
                "answer": str(a * b),
                "solution": worked_solution(partial_products(a, b), str(a * b)),
                "tool_solution": tool_segments(a, b),
                "task": TASK,
            }
        )
    return Dataset.from_list(rows)
