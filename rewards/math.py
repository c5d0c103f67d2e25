"""Math answer correctness: the final answer, taken from outside the think block, equals the sample's answer."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from rewards.registry import reward

_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer outside ``<think>``: the last ``<answer>`` block, else the last number; None if neither.

    An answer written only inside the think block does not count: the policy would learn to hedge there.
    The last-number fallback lets an untrained model that answers in prose be measured fairly.
    """
    visible = _THINK_BLOCK.sub("", text)
    answers = _ANSWER_TAG.findall(visible)
    if answers:
        return answers[-1].strip()
    numbers = _NUMBER.findall(visible.replace(",", ""))
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """The single number in ``text`` (commas and spaces ignored), or None when it holds zero or several."""
    numbers = _NUMBER.findall(text.replace(",", "").replace(" ", ""))
    if len(numbers) != 1:
        return None
    try:
        return Fraction(numbers[0])
    except (ValueError, ZeroDivisionError):
        return None


@reward("math_accuracy")
def math_accuracy(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the extracted answer is numerically equal to ``sample['answer']``; None for rows without one."""
    scores: list[float | None] = []
    for text, sample in zip(completions, samples, strict=True):
        gold = sample.get("answer")
        if gold is None:
            scores.append(None)
            continue
        answer = extract_answer(text)
        predicted = parse_number(answer) if answer is not None else None
        scores.append(1.0 if predicted is not None and predicted == parse_number(str(gold)) else 0.0)
    return scores
