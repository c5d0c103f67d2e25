"""Held-out evaluation: greedy accuracy, and with sampling pass@k, maj@k and verifier-guided best-of-n.

"Correct" means the first configured reward that applies to the row (its task's correctness verifier) scored 1.
"accuracy" is the greedy pass@1. Best-of-n is test-time compute: sample n, keep the completion the configured
rewards score highest (total), and report whether that one is correct.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from rewards.math import extract_answer
from rlreason.data import encode_prompts
from rlreason.passk import best_of_n, maj_at_k, mean_pass_at_k
from rlreason.rollout import RolloutEngine, SamplingParams
from rlreason.scoring import Scores, WeightedReward, score

CORRECT = 1.0 - 1e-9


def _generate(
    engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, rows: list[dict], n: int, sampling: SamplingParams, batch_size: int
) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    lengths: list[int] = []
    per_batch = max(1, batch_size // n)
    for start in range(0, len(rows), per_batch):
        rollout = engine.generate(encode_prompts(tokenizer, rows[start : start + per_batch]), n, sampling)
        texts += rollout.texts
        lengths += rollout.completion_mask.sum(dim=1).tolist()
    return texts, lengths


def _correct(scores: Scores) -> np.ndarray:
    """[N] bool: the correctness reward that applies to the row scored 1 (False where none applies)."""
    first = np.nan_to_num(scores.correctness(), nan=0.0)
    return first >= CORRECT


def sampled_metrics(
    texts: list[str], scores: Scores, n: int, ks: list[int]
) -> dict[str, float]:
    """pass@k, maj@k and best-of-n over ``n`` consecutive samples per prompt."""
    correct = _correct(scores).reshape(-1, n)
    answers = np.array([extract_answer(t) for t in texts], dtype=object).reshape(-1, n)
    totals = scores.total.reshape(-1, n)
    metrics = {}
    for k in sorted(set(ks)):
        if k > n:
            continue
        metrics[f"pass@{k}"] = mean_pass_at_k(correct.tolist(), k)
        metrics[f"maj@{k}"] = float(np.mean([maj_at_k(a.tolist(), c.tolist(), k) for a, c in zip(answers, correct, strict=True)]))
    metrics[f"best_of_{n}"] = float(np.mean([c[best_of_n(t.tolist())] for c, t in zip(correct, totals, strict=True)]))
    return metrics


def evaluate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    rewards: list[WeightedReward],
    max_new_tokens: int,
    batch_size: int = 64,
    reward_timeout: float | None = None,
    samples: int = 0,
    sampling: SamplingParams | None = None,
    ks: list[int] | None = None,
) -> dict[str, Any]:
    """Greedy completions for every row (accuracy, reward means, the samples); with ``samples`` = n > 0 also
    n sampled completions per row for pass@k, maj@k and best-of-n."""
    rows = dataset.to_list()
    texts, lengths = _generate(engine, tokenizer, rows, 1, SamplingParams(max_new_tokens, greedy=True), batch_size)
    scores = score(texts, rows, rewards, reward_timeout)
    first = scores.correctness()
    result: dict[str, Any] = {
        "accuracy": float(np.nanmean(first)) if not np.isnan(first).all() else 0.0,
        "rewards": scores.means(),
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "num_prompts": len(rows),
    }
    if samples > 0:
        sampled_texts, _ = _generate(engine, tokenizer, rows, samples, sampling or SamplingParams(max_new_tokens), batch_size)
        sampled_rows = [row for row in rows for _ in range(samples)]
        result.update(sampled_metrics(sampled_texts, score(sampled_texts, sampled_rows, rewards, reward_timeout), samples, ks or [1]))
    result["samples"] = [
        {"prompt": row["prompt"][-1]["content"], "completion": text, "answer": row.get("answer"), "rewards": dict(zip(scores.names, col.tolist(), strict=True))}
        for row, text, col in zip(rows, texts, scores.columns, strict=True)
    ]
    return result


def evaluate_config(
    config: Any, engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, rewards: list[WeightedReward]
) -> dict[str, Any]:
    """``evaluate`` with the settings of a run config (``run.eval_*`` and the ``eval`` section)."""
    run, ev = config.run, config.eval
    max_new = run.eval_max_new_tokens or config.rollout.max_new_tokens
    sampling = SamplingParams(max_new, ev.temperature, ev.top_p)
    return evaluate(engine, tokenizer, dataset, rewards, max_new, run.eval_batch_size, run.reward_timeout, ev.samples, sampling, ev.k)
