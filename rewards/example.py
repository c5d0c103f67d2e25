"""The reward to copy when writing your own; it teaches the default task something the answer check cannot.

``math_accuracy`` pays for the right number however it was reached; ``shown_work`` pays for thinking that
writes the sum out (``47+38=85``) and reaches the final answer with it, the habit the cold-start traces teach.
Listed next to the task's reward with a small weight, it keeps GRPO from trading the worked steps for guesses:
``rewards: [{name: math_accuracy, weight: 1.0}, {name: shown_work, weight: 0.2}]``. Copied into your own
package, it is named by import path (``mypkg.rewards:shown_work``) or by the name you register.
"""

from __future__ import annotations

import operator
import re
from typing import Any

from rewards import reward
from rewards.extract import final_answer

_EQUATION = re.compile(r"([0-9]{1,30})\s*([-+*])\s*([0-9]{1,30})\s*=\s*(-?[0-9]{1,30})", re.ASCII)
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _thinking(text: str) -> str:
    end = text.rfind("</think>")
    return text[:end] if end >= 0 else ""


@reward("shown_work")
def shown_work(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the thinking holds a true equation ``a op b = c`` whose ``c`` is the final answer."""
    scores: list[float | None] = []
    for text, sample in zip(completions, samples, strict=True):
        if sample.get("answer") is None:
            scores.append(None)
            continue
        reached = {str(int(c)) for a, op, b, c in _EQUATION.findall(_thinking(text)) if _APPLY[op](int(a), int(b)) == int(c)}
        scores.append(float(final_answer(text) in reached))
    return scores
