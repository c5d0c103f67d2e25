"""Score completions with the configured rewards: one column per reward, a weighted total per completion.

A reward that raises, returns garbage or outlives its timeout scores 0 for that call and is counted, so one
broken verifier never ends a run. A reward runs in a worker thread so the trainer can stop waiting for it; a
thread cannot be killed, so a hung one is abandoned (built-in verifiers that run untrusted code
do so in killable processes, see rewards.sandbox). ``None`` ("does not apply to this sample") is kept as NaN
in its column and contributes nothing to the total.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewards.registry import RewardFn, get_reward, required_fields

log = logging.getLogger(__name__)


@dataclass
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn


@dataclass
class Scores:
    names: list[str]
    columns: np.ndarray
    """[N, R] float64, NaN where a reward returned None."""
    total: np.ndarray
    """[N] weighted sum over the rewards that apply."""
    failures: dict[str, int] = field(default_factory=dict)
    """Completions per reward that scored 0 because the reward raised or returned something invalid."""

    def correctness(self) -> np.ndarray:
        """[N] per completion, the first configured reward that applies to it (NaN if none does).

        By convention a config lists each task's correctness verifier before any shaping reward, so in a mixed
        batch a math row is judged by the math verifier and a logic row by the logic one.
        """
        if not self.columns.shape[1]:
            return np.full(len(self.total), np.nan)
        applies = ~np.isnan(self.columns)
        first = np.where(applies.any(axis=1), applies.argmax(axis=1), 0)
        return self.columns[np.arange(len(first)), first]

    def means(self) -> dict[str, float]:
        """Mean of each reward over the samples it applies to (NaN-free: a reward that never applied is omitted)."""
        return {n: float(np.nanmean(c)) for n, c in zip(self.names, self.columns.T, strict=True) if not np.isnan(c).all()}


def resolve_rewards(specs: list[Any]) -> list[WeightedReward]:
    """Config reward entries (``name``, ``weight``) to callables."""
    return [WeightedReward(spec.name, spec.weight, get_reward(spec.name)) for spec in specs]


def _run_with_timeout(fn: Any, timeout: float | None, *args: Any) -> Any:
    """``fn(*args)`` in a daemon thread: a call that never returns is abandoned and cannot block exit."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="reward", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _call(
    reward: WeightedReward, completions: list[str], samples: list[dict[str, Any]], timeout: float | None
) -> tuple[np.ndarray, int]:
    try:
        values = _run_with_timeout(reward.fn, timeout, completions, samples)
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} scores for {len(completions)} completions")
        column = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except Exception as exc:  # a broken verifier must not end the run: it scores 0, and we say so
        log.warning("reward %r failed on a batch of %d: %s", reward.name, len(completions), exc)
        return np.zeros(len(completions)), len(completions)
    bad = ~np.isfinite(column) & ~np.isnan(column)
    column[bad] = 0.0
    return column, int(bad.sum())


def score(
    completions: list[str], samples: list[dict[str, Any]], rewards: list[WeightedReward], timeout: float | None = None
) -> Scores:
    """Every reward on every completion; a reward taking longer than ``timeout`` seconds scores 0 for the call."""
    columns, failures = [], {}
    for reward in rewards:
        column, failed = _call(reward, completions, samples, timeout)
        columns.append(column)
        if failed:
            failures[reward.name] = failed
    matrix = np.stack(columns, axis=1) if columns else np.zeros((len(completions), 0))
    weights = np.array([r.weight for r in rewards])
    total = np.nansum(matrix * weights, axis=1)
    return Scores([r.name for r in rewards], matrix, total, failures)


def missing_fields(rewards: list[WeightedReward], columns: list[str], task: str) -> list[str]:
    """A problem line for each reward whose declared sample fields the task's rows do not have."""
    problems = []
    for i, r in enumerate(rewards):
        missing = [f for f in required_fields(r.name) if f not in columns]
        if missing:
            problems.append(
                f"rewards[{i}].name: {r.name!r} reads the sample field(s) {missing}, which rows of task {task!r} "
                f"do not have (they have: {', '.join(columns)})"
            )
    return problems
