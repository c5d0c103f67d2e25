"""Several tasks in one dataset, for training on a mixture.

Each row keeps its ``task`` so rewards can dispatch on it (a reward returns None on rows it does not verify).
Tasks carry different verifier columns; the mixture has the union of them, and a row holds None in every
column its own task lacks. Rewards already read fields with ``sample.get(...)``, so they see exactly what the
task built, and ``datasets.concatenate_datasets`` accepts the parts because a column of None aligns with any
type (a column with the same name must have the same type in every task that has it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Dataset, concatenate_datasets

from tasks.registry import load_task

TaskSpec = tuple[str, float, Mapping[str, Any]]


def apportion(size: int, weights: Sequence[float]) -> list[int]:
    """Integer counts summing to ``size`` in proportion to ``weights`` (largest remainder; ties to the earlier)."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive and non-empty, got {list(weights)}")
    quotas = [size * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


def align(parts: Sequence[Dataset]) -> list[Dataset]:
    """The parts with one shared schema: every column of any part, None where a part lacks it."""
    features: dict[str, Any] = {}
    for part in parts:
        for name, feature in part.features.items():
            if features.setdefault(name, feature) != feature:
                raise ValueError(
                    f"column {name!r} has type {feature} in one task and {features[name]} in another"
                )
    aligned = []
    for part in parts:
        for name in features.keys() - set(part.column_names):
            part = part.add_column(name, [None] * len(part))  # null-typed; concatenation adopts the real type
        aligned.append(part)
    return aligned


def mix_tasks(specs: Sequence[TaskSpec], split: str, size: int, seed: int = 0) -> Dataset:
    """``size`` rows of ``split`` drawn from ``(task name, weight, options)`` specs in proportion to the weights.

    Row order is shuffled with ``seed`` so that any prefix of the mixture holds the tasks in proportion.
    """
    counts = apportion(size, [weight for _, weight, _ in specs])
    parts = [
        load_task(name, split, count, seed, **options)
        for (name, _, options), count in zip(specs, counts, strict=True)
        if count
    ]
    return concatenate_datasets(align(parts)).shuffle(seed=seed)
