"""MATH-format competition problems: ``problem`` plus a LaTeX ``solution`` whose answer is in ``\\boxed{}``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from datasets import Dataset

from tasks.prompts import chat, worked_solution
from tasks.registry import task
from tasks.sources import load_source, problem_key, sample_rows, split_rows

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_LEVEL = re.compile(r"\d+")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included; None if none closes.

    Regexes cannot balance braces (``\\boxed{\\frac{1}{2}}``), so the content is found by counting them.
    """
    for match in reversed(list(_BOX.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[match.end() : end].strip()
    return None


def _level(row: dict) -> int | None:
    """MATH writes ``"Level 3"``, MATH-500 writes ``3``; ``"Level ?"`` has none."""
    found = _LEVEL.search(str(row.get("level", "")))
    return int(found.group()) if found else None


@task("math", rewards=("math_accuracy",))
def competition_math(
    split: str,
    size: int,
    seed: int = 0,
    source: str = "DigitalLearningGmbH/MATH-lighteval",
    config: str | None = None,
    levels: Sequence[int] | None = None,
) -> Dataset:
    """``size`` MATH problems, optionally only of difficulty ``levels`` (1-5); ``source``: hub id or local path.

    The answer is the source's ``answer`` column where it has one (MATH-500), else the last box of the solution;
    rows with neither are dropped. Eval is the source's ``test`` split when it has one (see ``tasks.sources``).
    """
    rows = split_rows(load_source(source, config), split, key=lambda row: problem_key(row["problem"]))
    out = []
    for row in rows:
        answer = row.get("answer") or last_boxed(row["solution"])
        if answer is None or (levels is not None and _level(row) not in levels):
            continue
        out.append(
            {
                "prompt": chat(row["problem"]),
                "answer": answer,
                "solution": worked_solution(row["solution"], answer),
                "task": "math",
            }
        )
    return Dataset.from_list(sample_rows(out, size, seed, f"the {split} split of {source} (levels {levels})"))
