"""Format and shaping rewards: the R1 layout, and penalties for overlong or repetitive completions.

They read only the text, so they apply to every row (never None) and run in-process: regexes and counting
here are linear in the text, so even a huge completion cannot stall scoring.

- ``think_format``: 1.0 for exactly ``<think>...</think><answer>...</answer>``, both non-empty, nothing
  around them; else 0.0. An empty think block fails (a policy that skips thinking must not get format reward).
- ``tag_count_format``: 0.25 per R1 tag that appears exactly once: a denser signal early in training.
- ``think_format_soft``: 0.25 per part of the R1 layout reached in order (see ``r1_parts``), 1.0 only for the
  strict layout: a model that never writes the whole layout can still climb towards it part by part.
- ``length_penalty``: 0 up to LENGTH_LIMIT - LENGTH_BUFFER characters, then linearly down to -1 at the limit
  (DAPO's soft overlong punishment, measured in characters because rewards see text, not tokens).
- ``repetition_penalty``: -(share of repeated word 3-grams): 0 for varied text, near -1 for a loop.
``overlong_penalty`` and ``ngram_repetition_penalty`` build variants with other settings (see the README).
"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import RewardFn, reward

_STRICT_R1 = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
LENGTH_LIMIT = 16_000
LENGTH_BUFFER = 4_000


def is_strict_r1(text: str) -> bool:
    """Exactly one think block followed by exactly one answer block, both non-empty, nothing around them."""
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    match = _STRICT_R1.fullmatch(text)
    return match is not None and bool(match["think"].strip()) and bool(match["answer"].strip())


@reward("think_format")
def think_format(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 for the strict R1 layout, else 0.0."""
    return [1.0 if is_strict_r1(text) else 0.0 for text in completions]


@reward("tag_count_format")
def tag_count_format(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """0.25 for each of the four R1 tags that occurs exactly once."""
    return [0.25 * sum(text.count(tag) == 1 for tag in _TAGS) for text in completions]


def r1_parts(text: str) -> int:
    """How many parts of the R1 layout a completion reaches, each counted only after the one before it:
    1. a ``<think>`` tag opens a think block;
    2. a ``</think>`` closes it, with non-blank text between;
    3. exactly one ``<answer>`` block follows the ``</think>``, closed, with non-blank content;
    4. the whole completion is the strict layout (``is_strict_r1``: each tag once, nothing around).

    An answer block without a finished think block before it counts nothing: credit for it would pay a policy
    for dropping its reasoning. Several answer blocks count as none: a pure-RL run on the default model learned to
    farm this part with dozens of them (``<answer>45</answer><answer>9</answer>...``), its accuracy falling to 0.
    """
    opened = text.find("<think>")
    if opened < 0:
        return 0
    thought = opened + len("<think>")
    closed = text.find("</think>", thought)
    if closed < 0 or not text[thought:closed].strip():
        return 1
    start = text.find("<answer>", closed + len("</think>"))
    end = text.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    if end < 0 or not text[start + len("<answer>") : end].strip() or text.count("<answer>") > 1:
        return 2
    return 4 if is_strict_r1(text) else 3


@reward("think_format_soft")
def think_format_soft(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """0.25 for each part of the R1 layout reached in order: 0.25 an opened think block, 0.5 closed with content,
    0.75 then one answer block, 1.0 the strict layout (``think_format``'s 1.0)."""
    return [0.25 * r1_parts(text) for text in completions]


def overlong_penalty(limit: int, buffer: int) -> RewardFn:
    """A reward that is 0 up to ``limit - buffer`` characters, then falls linearly to -1 at ``limit`` and stays."""

    def penalty(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
        return [-min(max(len(text) - (limit - buffer), 0) / buffer, 1.0) for text in completions]

    return penalty


def ngram_repetition_penalty(n: int, max_penalty: float) -> RewardFn:
    """A reward of ``max_penalty`` times the share of word n-grams that repeat an earlier one."""

    def penalty(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
        scores: list[float | None] = []
        for text in completions:
            words = text.split()
            grams = list(zip(*(words[i:] for i in range(n)), strict=False))
            scores.append(max_penalty * (1 - len(set(grams)) / len(grams)) if grams else 0.0)
        return scores

    return penalty


length_penalty = reward("length_penalty")(overlong_penalty(LENGTH_LIMIT, LENGTH_BUFFER))
repetition_penalty = reward("repetition_penalty")(ngram_repetition_penalty(3, -1.0))
