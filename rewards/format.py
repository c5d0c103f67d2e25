"""Format rewards: did the completion follow the R1 ``<think>...</think><answer>...</answer>`` layout?"""

from __future__ import annotations

import re
from typing import Any

from rewards.registry import reward

_STRICT_R1 = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_strict_r1(text: str) -> bool:
    """Exactly one think block followed by exactly one answer block, both non-empty, nothing around them."""
    match = _STRICT_R1.fullmatch(text)
    if match is None or any(text.count(tag) != 1 for tag in _TAGS):
        return False
    return bool(match["think"].strip()) and bool(match["answer"].strip())


@reward("think_format")
def think_format(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 for the strict R1 layout, else 0.0."""
    return [1.0 if is_strict_r1(text) else 0.0 for text in completions]
