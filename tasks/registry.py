"""Name -> task builder.

A task builder returns a ``datasets.Dataset`` for one split. Every row carries ``prompt`` (chat messages),
``task`` (its name, so rewards can dispatch in mixed batches) and whatever its verifiers read (``answer``,
``tests``, ...). Rows may carry ``solution``: a worked reasoning trace used for the cold-start SFT.
Builders must keep ``train`` and ``eval`` disjoint (``tasks.sources.split_of`` assigns a problem by hash).

A task also names the rewards that verify its rows (``task_rewards``): the correctness rewards a config lists
to train on it. ``tasks.mix.mix_tasks`` combines tasks into one dataset.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset

from rewards.registry import import_modules

TaskBuilder = Callable[..., Dataset]
SPLITS = ("train", "eval")
REQUIRED_FIELDS = ("prompt", "task")

_TASKS: dict[str, TaskBuilder] = {}
_TASK_REWARDS: dict[str, tuple[str, ...]] = {}
_builtins_loaded = False


def task(name: str, rewards: Sequence[str] = ()) -> Callable[[TaskBuilder], TaskBuilder]:
    """Register a builder ``fn(split, size, seed, **options) -> Dataset`` under ``name``, verified by ``rewards``."""

    def register(fn: TaskBuilder) -> TaskBuilder:
        _TASKS[name] = fn
        _TASK_REWARDS[name] = tuple(rewards)
        return fn

    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        import_modules("tasks", skip=("registry", "prompts"))
        _builtins_loaded = True


def task_names() -> list[str]:
    _load_builtins()
    return sorted(_TASKS)


def get_task_builder(name: str) -> TaskBuilder:
    _load_builtins()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown task {name!r}{hint} (known: {', '.join(sorted(_TASKS))})")
    return _TASKS[name]


def task_rewards(name: str) -> tuple[str, ...]:
    """The correctness rewards of ``name``'s rows: 1.0 for a right completion, lower (usually 0) for a wrong one."""
    get_task_builder(name)
    return _TASK_REWARDS[name]


def load_task(name: str, split: str, size: int, seed: int = 0, **options: Any) -> Dataset:
    """Build ``size`` rows of ``split`` and check that they carry the fields every consumer relies on."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = get_task_builder(name)(split=split, size=size, seed=seed, **options)
    missing = [field for field in REQUIRED_FIELDS if field not in dataset.column_names]
    if missing:
        raise ValueError(f"task {name!r} rows lack the field(s) {missing}")
    return dataset
