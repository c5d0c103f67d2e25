"""Logic puzzles from reasoning-gym, each family a task named after it, scored by the family's own scorer.

Options are the family's reasoning-gym config fields (difficulty: ``n_people`` for knights_knaves,
``min_numbers``/``max_numbers`` for countdown, ...). Rows carry the entry as ``rewards.logic`` reads it:
``dataset`` (the family), ``question``, ``answer`` and ``metadata`` as a JSON string (its shape differs from
family to family, and the scorer needs it back exactly: countdown reads the numbers and target from it).
Math rewards skip these rows although they have an ``answer``. A family whose scorer evaluates answers that no
strict grammar covers (``rewards.answer_grammar.REFUSED``) cannot become a task: ``register_family`` raises.
"""

from __future__ import annotations

import json
from typing import Any

from datasets import Dataset

from rewards.answer_grammar import check_family
from tasks.gym import gym_entries
from tasks.prompts import chat
from tasks.registry import task

LOGIC_FAMILIES = (
    "countdown",
    "knights_knaves",
    "zebra_puzzles",
    "mini_sudoku",
    "syllogism",
    "circuit_logic",
    "family_relationships",
)


def register_family(family: str) -> None:
    """Make one reasoning-gym family a task of the same name, graded by ``logic_accuracy``."""
    check_family(family)

    @task(family, rewards=("logic_accuracy",))
    def build(split: str, size: int, seed: int = 0, **options: Any) -> Dataset:
        rows = [
            {
                "prompt": chat(entry["question"]),
                "question": entry["question"],
                "answer": entry["answer"],
                "metadata": json.dumps(entry["metadata"]),
                "dataset": family,
                "task": family,
            }
            for entry in gym_entries(family, split, size, seed, options)
        ]
        return Dataset.from_list(rows)


for _family in LOGIC_FAMILIES:
    register_family(_family)
