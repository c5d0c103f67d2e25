"""Logic rewards: reasoning-gym's own scorers for its puzzles, and exact match for plain answers.

Sample fields of a reasoning-gym row (what ``tasks.logic`` builds):
- ``dataset``: str, the reasoning-gym dataset name (``"countdown"``, ``"knights_knaves"``, ...);
- ``question``, ``answer``: str, the entry's own fields (``answer`` may be None for some families);
- ``metadata``: str, ``json.dumps`` of the entry's metadata (its shape differs per family; scorers need it).
A row with both ``dataset`` and ``metadata`` is a reasoning-gym row: ``logic_accuracy`` scores it, and the
math and exact-match rewards return None on it even though it has an ``answer``.

``logic_accuracy`` scores the content of the completion's single visible ``<answer>`` block (the format
reasoning-gym's prompts ask for; rewards.extract states the policy) with
``reasoning_gym.get_score_answer_fn(dataset)(answer, entry)``, clamped to [0, 1]. Every scorer call runs in a
sandbox job with a hard deadline, never in the trainer. The scorers of binary_matrix, n_queens, spiral_matrix and
string_insertion ``eval()`` the answer and countdown and puzzle24 hand it to sympy's ``parse_expr``: such a job
would run the answer as code next to the secret that frames its verdict, so those answers are first parsed by a
strict grammar in the trainer and the scorer sees only the canonical string re-built from the parsed data; an
answer that does not parse scores 0, and families no grammar covers score 0 (rewards.answer_grammar has the
family-by-family table).

``exact_match`` compares the final answer (rewards.extract) with ``answer`` after normalising case, runs of
whitespace, surrounding ``$``/quotes, ``\\text{}`` and a trailing period.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from rewards.answer_grammar import canonical_answer
from rewards.extract import answer_block, final_answer
from rewards.registry import reward
from rewards.sandbox.pool import Job, Limits, SandboxPool, shared_pool

MAX_ANSWER_CHARS = 20_000
LIMITS = Limits(timeout_s=5.0, memory_mb=1024, processes=4, output_bytes=1 << 16)
_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def is_reasoning_gym_row(sample: dict[str, Any]) -> bool:
    return bool(sample.get("dataset")) and sample.get("metadata") is not None


def score_job(dataset: str, entry: dict[str, Any], answer: str) -> Iterator[float]:
    """Sandbox job: reasoning-gym's score for ``answer``."""
    from reasoning_gym import get_score_answer_fn

    entry = {**entry, "metadata": json.loads(entry["metadata"])}
    yield float(get_score_answer_fn(dataset)(answer, entry))


def logic_pool() -> SandboxPool:
    return shared_pool("logic", preload=("rewards.logic", "reasoning_gym"))


def _clamp(results: list[Any]) -> float:
    score = results[0] if results else 0.0
    return min(max(score, 0.0), 1.0) if isinstance(score, float) and math.isfinite(score) else 0.0


def _scorer_input(sample: dict[str, Any], answer: str | None) -> str | None:
    """What the family's scorer is handed for ``answer``; None when the answer scores 0 without it."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    return canonical_answer(sample["dataset"], answer, str(sample.get("answer")))


def reasoning_gym_scores(completions: list[str], samples: list[dict[str, Any]],
                         pool: SandboxPool | None = None) -> list[float | None]:
    """Each completion's reasoning-gym score, None for rows that are not reasoning-gym puzzles."""
    scores: list[float | None] = []
    jobs: list[tuple[int, Job]] = []
    for i, (text, sample) in enumerate(zip(completions, samples, strict=True)):
        if not is_reasoning_gym_row(sample):
            scores.append(None)
            continue
        answer = _scorer_input(sample, answer_block(text))
        scores.append(0.0)
        if answer is not None:
            entry = {key: sample.get(key) for key in ("question", "answer", "metadata")}
            args = {"dataset": sample["dataset"], "entry": entry, "answer": answer}
            jobs.append((i, Job("rewards.logic:score_job", args, LIMITS)))
    outcomes = (pool or logic_pool()).map([job for _, job in jobs]) if jobs else []
    for (i, _), outcome in zip(jobs, outcomes, strict=True):
        scores[i] = _clamp(outcome.results)
    return scores


def normalise(text: str) -> str:
    """Text compared by exact_match: case-folded, whitespace collapsed, LaTeX/quote wrappers removed."""
    text = _TEXT.sub(r"\1", text.strip().strip("$").strip())
    return " ".join(text.strip("\"'").split()).casefold().rstrip(".").strip()


@reward("logic_accuracy", fields=("dataset", "metadata"))
def logic_accuracy(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """reasoning-gym's own score of the answer block, in [0, 1]."""
    return reasoning_gym_scores(completions, samples)


@reward("exact_match", fields=("answer",))
def exact_match(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """1.0 when the normalised final answer equals the normalised ``answer``; None for rows without one."""
    scores: list[float | None] = []
    for text, sample in zip(completions, samples, strict=True):
        gold = sample.get("answer")
        if gold is None or is_reasoning_gym_row(sample):
            scores.append(None)
            continue
        answer = final_answer(text)
        scores.append(float(answer is not None and normalise(answer) == normalise(str(gold))))
    return scores
