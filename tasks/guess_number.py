"""The number-guessing game: a multi-turn task whose rows hide a secret that only the environment's replies reveal.

Played in the ``guess_number`` environment (tasks.environments.guess_number) and scored by
``guess_number_solved`` (rewards.episodes). Every row asks the same question; the problem is the secret, kept in
``answer``, so the split is made on the secret: a secret of an eval row never occurs in training (about a tenth of
the range is held out). A split holds few secrets (about 90 and 10 of [1, 100]), so a size beyond that draws them
again, reshuffled: replaying a game is fine for RL, and no copy ever crosses the split.
"""

from __future__ import annotations

import random

from datasets import Dataset

from rewards.episodes import GUESS_TASK
from tasks.prompts import chat
from tasks.registry import task
from tasks.sources import split_of


def question(low: int, high: int) -> str:
    return (
        f"I am thinking of an integer between {low} and {high}. Find it in as few guesses as you can. Each turn, "
        "give one guess as <guess>N</guess>; I will reply \"higher\" if my number is greater than your guess, "
        "\"lower\" if it is smaller, and \"correct\" when you have found it."
    )


def secrets_of(split: str, low: int, high: int) -> list[int]:
    """The secrets of ``low..high`` that belong to ``split``; keyed on the number alone, so every range agrees."""
    return [secret for secret in range(low, high + 1) if split_of(f"{GUESS_TASK}-{secret}") == split]


@task(GUESS_TASK, rewards=("guess_number_solved",))
def guess_number(split: str, size: int, seed: int = 0, low: int = 1, high: int = 100) -> Dataset:
    """``size`` games of ``split``, each a secret of ``low..high`` (the difficulty knob: the width of the range)."""
    if low > high:
        raise ValueError(f"low must be <= high, got {low} > {high}")
    pool = secrets_of(split, low, high)
    if not pool and size:
        raise ValueError(f"no secret of {low}..{high} falls in the {split} split; widen the range")
    rng = random.Random(f"{GUESS_TASK}-{split}-{seed}-{low}-{high}")
    secrets: list[int] = []
    while len(secrets) < size:
        secrets += rng.sample(pool, len(pool))
    prompt = chat(question(low, high))
    return Dataset.from_list([{"prompt": prompt, "answer": str(s), "task": GUESS_TASK} for s in secrets[:size]])
