"""Rewards of multi-turn episodes: they score what happened over the turns (``sample["turns"]``), not one text.

``guess_number_solved`` scores the number-guessing game (tasks.guess_number, played in the environment
tasks.environments.guess_number): 1.0 when the episode's last guess is the secret (the row's ``answer``), else
0.0; None on rows of other tasks. There is no bonus for fewer guesses: the turn limit (``rollout.max_turns``) is
what rewards a good search, since halving the range finds any secret of [1, 100] within 7 guesses and a scan
does not. Without ``turns`` (a plain completion), the completion is the episode's one turn.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import reward

GUESS_TASK = "guess_number"
_GUESS = re.compile(r"<guess>\s*([+-]?\d+)\s*</guess>", re.IGNORECASE)


def parse_guess(text: str) -> int | None:
    """The last ``<guess>N</guess>`` of a turn, or None (the game's one answer grammar, shared with its environment)."""
    found = _GUESS.findall(text)
    return int(found[-1]) if found else None


def last_guess(turns: list[dict[str, Any]]) -> int | None:
    """The episode's final guess: the last one in the policy's turns."""
    guesses = [parse_guess(turn["content"]) for turn in turns if turn["role"] == "assistant"]
    return next((guess for guess in reversed(guesses) if guess is not None), None)


@reward("guess_number_solved", fields=("answer",))
def guess_number_solved(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the final guess of the episode is the secret."""
    scores: list[float | None] = []
    for completion, sample in zip(completions, samples, strict=True):
        if sample.get("task") != GUESS_TASK:
            scores.append(None)
            continue
        turns = sample.get("turns") or [{"role": "assistant", "content": completion}]
        scores.append(float(last_guess(turns) == int(sample["answer"])))
    return scores
