"""Held-out accuracy: greedy decoding on a task's eval split, scored by the run's rewards.

"accuracy" is the mean of the first configured reward (by convention the task's correctness verifier).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from rlreason.data import encode_prompts
from rlreason.rollout import RolloutEngine, SamplingParams
from rlreason.scoring import WeightedReward, score


def evaluate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    rewards: list[WeightedReward],
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Greedy completions for every row; returns accuracy, reward means and the samples themselves."""
    rows = dataset.to_list()
    sampling = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        rollout = engine.generate(encode_prompts(tokenizer, batch), 1, sampling)
        texts += rollout.texts
        lengths += rollout.completion_mask.sum(dim=1).tolist()
    scores = score(texts, rows, rewards)
    first = scores.columns[:, 0] if scores.columns.shape[1] else np.zeros(len(rows))
    return {
        "accuracy": float(np.nanmean(first)) if not np.isnan(first).all() else 0.0,
        "rewards": scores.means(),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "num_prompts": len(rows),
        "samples": [
            {"prompt": row["prompt"][-1]["content"], "completion": text, "answer": row.get("answer"), "rewards": dict(zip(scores.names, col.tolist(), strict=True))}
            for row, text, col in zip(rows, texts, scores.columns, strict=True)
        ],
    }
