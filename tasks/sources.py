"""Finite datasets: where their rows come from, and how each row lands in exactly one of train and eval.

Two rules keep the splits disjoint whatever the source:

- a source with a ``test`` split (GSM8K, MATH, MBPP on the hub, or a local folder holding ``test.jsonl``) keeps
  it as eval, so scores stay comparable with published ones, and trains on its other splits minus every problem
  whose key also occurs in test;
- a source without one (a single local file, HumanEval) is divided by ``split_of`` on each problem's key.

Keys are the problem text with whitespace collapsed, so a problem repeated with other spacing counts once.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from datasets import DatasetDict, load_dataset

EVAL_FRACTION = 0.1
EVAL_SOURCE_SPLIT = "test"
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

Row = dict[str, Any]


def split_of(key: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """A fixed, seed-independent split for one problem, so train and eval never share it."""
    digest = hashlib.sha256(key.encode()).digest()
    return "eval" if digest[0] < 256 * eval_fraction else "train"


def problem_key(text: str) -> str:
    """What makes two problems the same: their text up to whitespace."""
    return " ".join(text.split())


def load_source(source: str, config: str | None = None) -> DatasetDict:
    """A hub id (with its ``config``) or a local folder as ``datasets.load_dataset`` reads it; a file by its type.

    A lone file becomes one split named ``train``, a folder's splits are named after its files (``train.jsonl``,
    ``test.parquet``). Hub ids keep their real code path, so an online user gets the published dataset and an
    offline one points ``source`` at a downloaded copy.
    """
    path = Path(source)
    if path.is_file():
        suffix = next((s for s in path.suffixes if s in _FILE_BUILDERS), None)
        if suffix is None:
            raise ValueError(f"{source}: unknown data file type; use one of {sorted(_FILE_BUILDERS)}")
        return load_dataset(_FILE_BUILDERS[suffix], data_files=str(path))
    if path.is_dir():
        return load_dataset(str(path))
    return load_dataset(source, config)


def split_rows(
    source: Mapping[str, Iterable[Row]],
    split: str,
    key: Callable[[Row], str],
    eval_fraction: float = EVAL_FRACTION,
) -> list[Row]:
    """The rows of ``split`` (see the module docstring for the rule), each problem once, in source order."""
    if EVAL_SOURCE_SPLIT in source:
        eval_rows = list(source[EVAL_SOURCE_SPLIT])
        if split == "eval":
            candidates = eval_rows
        else:
            held_out = {key(row) for row in eval_rows}
            candidates = [row for name, rows in source.items() if name != EVAL_SOURCE_SPLIT for row in rows]
            candidates = [row for row in candidates if key(row) not in held_out]
    else:
        candidates = [
            row for rows in source.values() for row in rows if split_of(key(row), eval_fraction) == split
        ]
    unique: dict[str, Row] = {}
    for row in candidates:
        unique.setdefault(key(row), row)
    return list(unique.values())


def sample_rows(rows: list[Row], size: int, seed: int, what: str) -> list[Row]:
    """``size`` rows drawn without replacement in a seeded order; asking for more than exist is an error."""
    if size > len(rows):
        raise ValueError(f"{what} has only {len(rows)} problems; ask for at most {len(rows)}")
    return random.Random(seed).sample(rows, size)
