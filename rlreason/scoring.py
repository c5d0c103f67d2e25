"""Score completions with the configured rewards: one column per reward, a weighted total per completion.

A reward that raises, returns garbage or outlives its timeout scores 0 for that call and is counted (and its
error kept in ``Scores.errors``), so one broken verifier never ends a run. ``None`` ("does not apply to this
sample") is kept as NaN in its column and contributes nothing to the total.

Timeouts: each reward call gets ``timeout`` seconds as a batch deadline (``rewards.sandbox.pool.batch_deadline``),
which sandboxed verifiers honour per completion: jobs still running at the deadline are killed and jobs not
started are not run, each scoring what it managed (0 for a program that hung), while completions whose jobs
finished keep their scores. A reward runs in a worker thread; if it has not returned LAST_RESORT_S after the
deadline (a verifier that ignores the deadline), the call is abandoned and scores 0 for the whole batch
(a thread cannot be killed).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewards.registry import RewardFn, get_reward, registered_name, required_fields
from rewards.sandbox.pool import batch_deadline

log = logging.getLogger(__name__)
LAST_RESORT_S = 2.0


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
    errors: dict[str, str] = field(default_factory=dict)
    """Reward name -> the error of a call that failed as a whole (raised, e.g. ``SandboxError``, timed out, or
    returned the wrong number of scores): its column is 0 but says nothing about the completions."""

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


def concat_scores(pieces: list[tuple[Scores, Any]], calls: list[Scores]) -> Scores:
    """Rows taken from scores of several calls (processes, sampling rounds) as one batch's ``Scores``.

    ``pieces`` are (scores, rows: a slice or index list) in batch order; ``calls`` are the calls whose failures
    and errors the batch reports, each listed once, including calls none of whose rows were kept.
    """
    failures: dict[str, int] = {}
    errors: dict[str, str] = {}
    for call in calls:
        for name, count in call.failures.items():
            failures[name] = failures.get(name, 0) + count
        for name, error in call.errors.items():
            errors.setdefault(name, error)
    return Scores(
        pieces[0][0].names,
        np.concatenate([s.columns[rows] for s, rows in pieces]),
        np.concatenate([s.total[rows] for s, rows in pieces]),
        failures,
        errors,
    )


def resolve_rewards(specs: list[Any]) -> list[WeightedReward]:
    """Config reward entries (``name``, ``weight``) to callables.

    A ``module:function`` entry whose function is registered with ``@reward("name")`` is named "name" (its
    metrics column, and the sample fields it declared, are the registered reward's).
    """
    rewards = []
    for spec in specs:
        fn = get_reward(spec.name)
        name = (registered_name(fn) or spec.name) if ":" in spec.name else spec.name
        rewards.append(WeightedReward(name, spec.weight, fn))
    return rewards


def _run_with_timeout(fn: Any, timeout: float | None, *args: Any) -> Any:
    """``fn(*args)`` under a batch deadline of ``timeout`` seconds, in a daemon thread: a call still running
    LAST_RESORT_S after the deadline is abandoned and cannot block exit."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            with batch_deadline(timeout):
                outcome["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="reward", daemon=True)
    thread.start()
    thread.join(None if timeout is None else timeout + LAST_RESORT_S)
    if thread.is_alive():
        raise TimeoutError(f"no result {LAST_RESORT_S} s after its deadline of {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _call(
    reward: WeightedReward, completions: list[str], samples: list[dict[str, Any]], timeout: float | None
) -> tuple[np.ndarray, int, str | None]:
    """The reward's column, how many of its values were replaced by 0, and the error if the call failed."""
    try:
        values = _run_with_timeout(reward.fn, timeout, completions, samples)
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} scores for {len(completions)} completions")
        column = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except Exception as exc:  # a broken verifier must not end the run: it scores 0, and we say so
        log.warning("reward %r failed on a batch of %d: %s", reward.name, len(completions), exc)
        return np.zeros(len(completions)), len(completions), f"{type(exc).__name__}: {exc}"
    bad = ~np.isfinite(column) & ~np.isnan(column)
    column[bad] = 0.0
    return column, int(bad.sum()), None


def score(
    completions: list[str], samples: list[dict[str, Any]], rewards: list[WeightedReward], timeout: float | None = None
) -> Scores:
    """Every reward on every completion, each call with a deadline of ``timeout`` seconds (see the module)."""
    columns, failures, errors = [], {}, {}
    for reward in rewards:
        column, failed, error = _call(reward, completions, samples, timeout)
        columns.append(column)
        if failed:
            failures[reward.name] = failed
        if error is not None:
            errors[reward.name] = error
    matrix = np.stack(columns, axis=1) if columns else np.zeros((len(completions), 0))
    weights = np.array([r.weight for r in rewards])
    total = np.nansum(matrix * weights, axis=1)
    return Scores([r.name for r in rewards], matrix, total, failures, errors)


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
