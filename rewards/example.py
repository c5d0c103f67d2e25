"""The reward to copy when writing your own: a bonus for short final answers.

Copy this file into your package, rename the function and the registered name, and list the reward in a
config, by registered name or by import path: ``rewards: [{name: mypkg.rewards:concise_answer, weight: 0.1}]``.
"""

from __future__ import annotations

from typing import Any

from rewards import reward
from rewards.extract import final_answer


@reward("concise_answer")
def concise_answer(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the final answer has at most ``sample["max_answer_words"]`` words (default 5); None without answer."""
    scores: list[float | None] = []
    for text, sample in zip(completions, samples, strict=True):
        if sample.get("answer") is None:  # not a question with a short answer (a code row, say): does not apply
            scores.append(None)
            continue
        answer = final_answer(text)  # after </think>, one <answer> block or \boxed{}; None if there is none
        scores.append(float(answer is not None and len(answer.split()) <= sample.get("max_answer_words", 5)))
    return scores
