"""What a step's completions look like, as numbers: length, accuracy per task, and the signs of reasoning.

The R1 story was read off such curves: completions grow longer, reflection ("wait, let me re-check") appears,
answers get revised inside the think block, the format settles. These functions turn a step's texts into
those curves; they are pure (texts and numbers in, a dict of floats out), so the trainer logs them and the
inspect command re-reads them without a model.

- Reflection rate: occurrences of the configured phrases per 1,000 completion tokens. A phrase matches
  case-insensitively at word boundaries ("wait" does not match "awaits"); a space matches any whitespace.
- Format adherence: share of completions in the strict R1 layout (``rewards.format.is_strict_r1``).
- Answer changes: per completion, how often the think block announces a result that differs from the one it
  announced before (see ``candidate_answers``); 0 without a think block.
- Milestones: the first step at which a metric reaches a threshold, e.g. "reflection passed 1 per 1k tokens
  at step 40".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from rewards.extract import visible_text
from rewards.format import is_strict_r1

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_ANNOUNCED = re.compile(r"\banswer\s*(?:is|=|:)\s*:?\s*(?P<value>.+)", re.IGNORECASE)
_CONCLUSION = re.compile(r"^\s*(?:so|therefore|thus|hence)\b", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?[0-9][0-9,]*(?:\.[0-9]+)?(?:/[0-9]+)?")


def phrase_pattern(phrases: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for all phrases (longest first, so "let me re-check" wins over a shorter overlap); None if empty."""
    parts = sorted({p.strip().lower() for p in phrases if p.strip()}, key=len, reverse=True)
    if not parts:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, p.split())) for p in parts)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def split_think(text: str) -> tuple[str, str]:
    """(think, answer): the reasoning inside ``<think>`` and the text after it. Without tags everything is answer;
    a think block that never closes is all think (the completion was cut off while reasoning)."""
    visible = visible_text(text)
    if visible is None:
        return text[text.find("<think>") + len("<think>") :], ""
    end = text.rfind("</think>")
    if end < 0:
        return "", text
    start = text.find("<think>")
    think = text[start + len("<think>") : end] if 0 <= start < end else text[:end]
    return think, visible


def _normalise(value: str) -> str:
    numbers = _NUMBER.findall(value)
    return numbers[0].replace(",", "") if numbers else value.strip().rstrip(".").strip()


def candidate_answers(think: str) -> list[str]:
    r"""The results a think block announces, in order, one per sentence at most: a ``\boxed{}`` value, an
    "answer is X" / "answer: X", or the last number of a sentence starting with so/therefore/thus/hence."""
    found = []
    for sentence in _SENTENCE_END.split(think):
        if boxed := _BOXED.findall(sentence):
            found.append(_normalise(boxed[-1]))
        elif announced := _ANNOUNCED.search(sentence):
            found.append(_normalise(announced["value"]))
        elif _CONCLUSION.match(sentence) and (numbers := _NUMBER.findall(sentence)):
            found.append(numbers[-1].replace(",", ""))
    return [c for c in found if c]


def answer_changes(text: str) -> int:
    """How often the think block's announced result differs from the one announced just before it."""
    candidates = candidate_answers(split_think(text)[0])
    return sum(a != b for a, b in zip(candidates, candidates[1:], strict=False))


def token_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    """Token counts of texts under ``tokenizer`` without special tokens: the unit of ``completion_length``."""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    return count


def reasoning_stats(
    texts: Sequence[str],
    token_lengths: Sequence[float],
    phrases: Iterable[str],
    count_tokens: Callable[[list[str]], list[int]],
) -> dict[str, float]:
    """A step's reasoning metrics. ``token_lengths`` are the completions' token counts (the rate's denominator);
    ``count_tokens`` measures the think and answer parts in the same unit."""
    if not texts:
        return {}
    pattern = phrase_pattern(phrases)
    reflections = sum(len(pattern.findall(t)) for t in texts) if pattern else 0
    thinks, answers = zip(*(split_think(t) for t in texts), strict=True)
    total_tokens = float(sum(token_lengths))
    return {
        "reasoning/reflections_per_1k": 1000.0 * reflections / total_tokens if total_tokens else 0.0,
        "reasoning/format_adherence": float(np.mean([is_strict_r1(t) for t in texts])),
        "reasoning/answer_changes": float(np.mean([answer_changes(t) for t in texts])),
        "think_length": float(np.mean(_part_lengths(thinks, texts, token_lengths, count_tokens))),
        "answer_length": float(np.mean(_part_lengths(answers, texts, token_lengths, count_tokens))),
    }


def _part_lengths(parts: Sequence[str], texts: Sequence[str], token_lengths: Sequence[float], count_tokens: Callable[[list[str]], list[int]]) -> list[float]:
    """Token counts of parts of completions. A part that is the whole completion (no tags: all answer) has the
    completion's count, known already: re-tokenizing a step's text costs as much as a training micro-batch."""
    lengths = [float(n) if part == text else 0.0 for part, text, n in zip(parts, texts, token_lengths, strict=True)]
    todo = [i for i, (part, text) in enumerate(zip(parts, texts, strict=True)) if part and part != text]
    for i, n in zip(todo, count_tokens([parts[i] for i in todo]), strict=True):
        lengths[i] = float(n)
    return lengths


def length_stats(token_lengths: Sequence[float], truncated: Sequence[bool]) -> dict[str, float]:
    """Completion length in tokens: mean, 90th percentile, max, and the share cut off at max_new_tokens."""
    lengths = np.asarray(token_lengths, dtype=np.float64)
    if lengths.size == 0:
        return {}
    return {
        "completion_length": float(lengths.mean()),
        "completion_length_p90": float(np.percentile(lengths, 90)),
        "completion_length_max": float(lengths.max()),
        "truncated_fraction": float(np.mean(np.asarray(truncated, dtype=np.float64))),
    }


def task_accuracy(tasks: Sequence[str | None], correct: Sequence[float]) -> dict[str, float]:
    """``accuracy/<task>`` for every task in a mixed batch; NaN scores (reward does not apply) are left out."""
    values = np.asarray(correct, dtype=np.float64)
    out = {}
    for name in sorted({t for t in tasks if t}):
        mine = values[[t == name for t in tasks]]
        if not np.isnan(mine).all():
            out[f"accuracy/{name}"] = float(np.nanmean(mine))
    return out


def first_crossings(rows: Iterable[dict[str, Any]], thresholds: dict[str, float]) -> dict[str, int | None]:
    """For each metric, the first logged step whose value is >= its threshold (None: never reached)."""
    milestones = Milestones(thresholds)
    for row in rows:
        milestones.update(row)
    return dict(milestones.reached)


class Milestones:
    """Watches metric rows as they arrive and says which thresholds are crossed for the first time."""

    def __init__(self, thresholds: dict[str, float], history: Iterable[dict[str, Any]] = ()):
        self.thresholds = dict(thresholds)
        self.reached: dict[str, int | None] = dict.fromkeys(self.thresholds)
        for row in history:  # a resumed run has already announced its earlier crossings
            self.update(row)

    def update(self, row: dict[str, Any]) -> list[str]:
        """Record ``row``; return one message per metric that reached its threshold at this step."""
        messages = []
        for name, threshold in self.thresholds.items():
            value = row.get(name)
            if self.reached[name] is None and isinstance(value, (int, float)) and value >= threshold:
                self.reached[name] = row["step"]
                messages.append(f"{name} reached {threshold:g} at step {row['step']} ({value:.3g})")
        return messages
