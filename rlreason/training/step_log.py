"""One training step as it is logged: its completions and stats on one process or gathered from all, the
metrics row of ``metrics.jsonl`` and the rows of ``completions.jsonl`` built from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlreason.objective.objective import TokenMean
from rlreason.observe.reasoning import length_stats, reasoning_stats, task_accuracy
from rlreason.scoring import Scores, concat_scores

SUMMED_STATS = ("overlong/penalized", "overlong/masked", "dynamic_sampling/dropped_groups", "dynamic_sampling/refilled_groups")
"""Counts of one process's share of the step: the step's count is their sum."""


def merge_process_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every process's stats of one step as the step's: token means and counts summed over processes; the rest,
    equal on every process (grad_norm, sampling rounds) or each process's share of a sum (the loss, whose token
    weights are scaled by the number of processes), averaged."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [part[key] for part in parts if key in part]
        if isinstance(values[0], TokenMean) or key in SUMMED_STATS:
            merged[key] = sum(values[1:], values[0])
        else:
            merged[key] = float(np.mean(values))
    return merged


class TokenSums:
    """Per-token metrics summed over micro-batches as [sum, tokens] pairs kept on the device (a float() per
    micro-batch would stall the GPU), read once at the end of the update as ``TokenMean``s."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor, where: torch.Tensor) -> None:
        pair = torch.stack([(values.float() * where).sum(), where.sum()])
        self._sums[name] = self._sums[name] + pair if name in self._sums else pair

    def means(self) -> dict[str, TokenMean]:
        return {name: TokenMean(*pair.tolist()) for name, pair in self._sums.items()}


@dataclass(frozen=True)
class StepTimes:
    """Wall-clock seconds of a step's phases."""

    generate: float
    score: float
    optimize: float

    @property
    def step(self) -> float:
        return self.generate + self.score + self.optimize


@dataclass(frozen=True)
class ReasoningInputs:
    """What ``reasoning_stats`` needs besides the completions: the reflection phrases and a token counter."""

    phrases: list[str]
    count_tokens: Callable[[list[str]], list[int]]


@dataclass(frozen=True)
class StepRecord:
    """A step's completions, in group order, with their scores and advantages, and the step's stats."""

    samples: list[dict[str, Any]]
    texts: list[str]
    scores: Scores
    advantages: list[float]
    lengths: list[float]
    truncated: list[bool]
    stats: dict[str, Any]
    tokens: int
    turns: list[list[dict[str, Any]]] | None = None
    """Each completion's episode, role-tagged (``Rollout.turns``); None for plain completions."""
    observation_tokens: list[int] | None = None
    """Tokens the environment appended to each episode; None for plain completions."""


def gather_step(local: StepRecord, gather: Callable[[list[Any]], list[Any]]) -> StepRecord:
    """Every process's share of the step, concatenated in process order; stats merged (``merge_process_stats``).
    ``gather`` is accelerate's ``gather_object``."""
    parts: list[StepRecord] = gather([local])

    def cat(field: str) -> list:
        return [item for part in parts for item in getattr(part, field)]

    episodes = local.turns is not None  # one config, so every process runs episodes or none does
    return StepRecord(
        samples=cat("samples"), texts=cat("texts"),
        scores=concat_scores([(p.scores, slice(None)) for p in parts], [p.scores for p in parts]),
        advantages=cat("advantages"), lengths=cat("lengths"), truncated=cat("truncated"),
        stats=merge_process_stats([p.stats for p in parts]), tokens=sum(p.tokens for p in parts),
        turns=cat("turns") if episodes else None, observation_tokens=cat("observation_tokens") if episodes else None,
    )


def episode_stats(record: StepRecord) -> dict[str, float]:
    """Per-episode means of how a step's episodes went: the policy's turns, the tool's answers and how many of
    them were failed calls, and the environment's tokens (which the loss does not read, so the length curves
    leave them out). Nothing for plain completions."""
    if record.turns is None or record.observation_tokens is None:
        return {}
    tools = [[t for t in episode if t["role"] == "tool"] for episode in record.turns]
    return {
        "episode/turns": float(np.mean([sum(t["role"] == "assistant" for t in episode) for episode in record.turns])),
        "episode/tool_calls": float(np.mean([len(calls) for calls in tools])),
        "episode/tool_errors": float(np.mean([sum(bool(t.get("error")) for t in calls) for calls in tools])),
        "episode/observation_tokens": float(np.mean(record.observation_tokens)),
    }


def metrics_row(
    record: StepRecord, step: int, group_size: int, times: StepTimes, reasoning: ReasoningInputs, extra: dict[str, Any]
) -> dict[str, Any]:
    """The step's line of ``metrics.jsonl``; ``extra`` holds the trainer's own entries (learning rate, processes)."""
    scores, first = record.scores, record.scores.correctness()
    rewards = torch.tensor(scores.total, dtype=torch.float32).view(-1, group_size)
    return {
        "step": step,
        "reward": float(scores.total.mean()),
        "reward_std": float(scores.total.std()),
        **{f"rewards/{name}": value for name, value in scores.means().items()},
        "accuracy": float(np.nanmean(first)) if not np.isnan(first).all() else 0.0,
        **task_accuracy([s.get("task") for s in record.samples], first),
        "zero_std_groups": float((rewards.std(dim=1) == 0).float().mean()),
        **length_stats(record.lengths, record.truncated),
        **reasoning_stats(record.texts, record.lengths, reasoning.phrases, reasoning.count_tokens),
        **episode_stats(record),
        **{key: value.value if isinstance(value, TokenMean) else value for key, value in record.stats.items()},
        **extra,
        "reward_failures": sum(scores.failures.values()),
        "time_generate": times.generate,
        "time_score": times.score,
        "time_optimize": times.optimize,
        "time_step": times.step,
        "tokens_per_s": record.tokens / times.step,
    }


def completion_rows(record: StepRecord, step: int) -> list[dict[str, Any]]:
    """The step's lines of ``completions.jsonl``: every completion with its rewards, advantage and length, and
    an episode's turns."""
    scores = record.scores
    turns = record.turns if record.turns is not None else [None] * len(record.texts)
    return [
        {
            "step": step,
            "task": sample.get("task"),
            "prompt": sample["prompt"][-1]["content"],
            "answer": sample.get("answer"),
            "completion": text,
            "rewards": dict(zip(scores.names, column.tolist(), strict=True)),
            "total": float(total),
            "advantage": float(advantage),
            "length": int(length),
            "truncated": bool(truncated),
            **({"turns": episode} if episode is not None else {}),
        }
        for sample, text, column, total, advantage, length, truncated, episode in zip(
            record.samples, record.texts, scores.columns, scores.total, record.advantages, record.lengths,
            record.truncated, turns, strict=True,
        )
    ]
