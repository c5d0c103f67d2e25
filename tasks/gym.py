"""reasoning-gym generators as split-safe sources of ``{question, answer, metadata}`` entries.

Generator seeds alone cannot keep splits apart (two seeds can draw the same puzzle), so both splits walk the
same seeded stream and each keeps only the puzzles that ``split_of`` assigns to it, each question once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks.sources import EVAL_FRACTION, problem_key, split_of

_SLACK = 4  # draws budgeted per kept puzzle beyond the split's share, for duplicates and bad luck


def config_fields(family: str) -> list[str]:
    """The reasoning-gym config fields a task's options may set (its difficulty knobs)."""
    from reasoning_gym.factory import DATASETS

    return [f.name for f in dataclasses.fields(DATASETS[family][1]) if f.name not in ("seed", "size")]


def gym_entries(
    family: str, split: str, size: int, seed: int, options: dict[str, Any]
) -> list[dict[str, Any]]:
    """``size`` distinct puzzles of ``family`` from ``split``; ``options`` go to the reasoning-gym config."""
    import reasoning_gym  # here, not at the top: it loads ~100 generators and every task module is imported

    share = EVAL_FRACTION if split == "eval" else 1 - EVAL_FRACTION
    budget = int(_SLACK * size / share) + 100
    try:
        dataset = reasoning_gym.create_dataset(family, seed=seed, size=budget, **options)
    except (TypeError, AssertionError, ValueError) as exc:
        raise ValueError(
            f"{family}: invalid options {options} ({exc}); settable: {config_fields(family)}"
        ) from exc
    entries: dict[str, dict[str, Any]] = {}
    for index in range(budget):
        if len(entries) == size:
            break
        entry = dataset[index]
        key = problem_key(entry["question"])
        if split_of(key) == split:
            entries.setdefault(key, entry)
    if len(entries) < size:
        raise ValueError(
            f"{family} {options}: found only {len(entries)} distinct {split} puzzles in {budget} draws"
        )
    return list(entries.values())
