"""Held-out evaluation: greedy accuracy, and with sampling unbiased pass@k and maj@k.

"Correct" means the first configured reward that applies to the row (its task's correctness verifier) scored 1.
"accuracy" is the greedy pass@1.

One evaluation gives one number whichever command runs it: the trainer and ``rlreason eval`` both build their
engine with ``policy_engine``, read the prompts with ``eval_split`` and evaluate with ``evaluate_config``, which
generates in the precision ``precision`` derives from ``train.bf16`` (bf16 autocast and fp32 give different greedy
completions) and names it in the result.

A verifier that fails (its sandbox cannot start, it times out) leaves the metrics it decides missing (None, shown
as "n/a") with its error in ``verifier_errors``: a 0 would read as a model that got everything wrong.

There is no best-of-n: choosing the best of n samples with the correctness verifier reads the gold answer, so it
is pass@n under another name; choosing by agreement among the samples is maj@n, reported already; and the code
tasks' rows carry no public examples apart from the hidden tests that a deployed model could choose with.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rewards.math import extract_answer
from rlreason.data import task_dataset
from rlreason.models import bf16_available
from rlreason.observe.passk import maj_at_k, mean_pass_at_k
from rlreason.rollout.engine import HFEngine, RolloutEngine, SamplingParams
from rlreason.rollout.episodes import Episodes, complete, scored_samples
from rlreason.rollout.fast import build_engine
from rlreason.rollout.sampling import completion_seed
from rlreason.scoring import Scores, WeightedReward, score

CORRECT = 1.0 - 1e-9


def precision(config: Any) -> str:
    """"bf16" where ``train.bf16`` asks for bf16 autocast ("true", or "auto" on hardware with bf16), else "fp32"."""
    setting = config.train.bf16
    return "bf16" if setting == "true" or (setting == "auto" and bf16_available()) else "fp32"


def policy_engine(config: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The engine ``rollout.engine`` names, computing in the config's precision: what the trainer samples and
    evaluates with, and what ``rlreason eval`` evaluates with (in weight copies of its own under
    ``train.async_rollouts``, which samples from a snapshot while the model trains)."""
    own = config.train.async_rollouts or None  # None: the engine's own choice
    return build_engine(config.rollout.engine, model, tokenizer, precision(config) == "bf16", own_weights=own)


def eval_seed(config: Any) -> int:
    """``eval.seed``, or ``train.seed`` when it is not set."""
    return config.train.seed if config.eval.seed is None else config.eval.seed


def eval_split(config: Any) -> Dataset:
    """The held-out prompts of a config: ``task.eval_size`` rows of the eval split drawn with ``eval_seed``."""
    return task_dataset(config.task, "eval", eval_seed(config))


def _autocast(engine: RolloutEngine, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast around an engine that runs the model's forward (the trainer's model already carries
    accelerate's; nesting the same autocast changes nothing). The fast engine computes from the weights in its
    own dtype, so it runs as the trainer runs it."""
    if not (bf16 and isinstance(engine, HFEngine)):
        return contextlib.nullcontext()
    return torch.autocast(engine.model.device.type, dtype=torch.bfloat16)


def _generate(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    n: int,
    sampling: SamplingParams,
    batch_size: int,
    seed: int,
    bar: tqdm,
    episodes: Episodes | None = None,
    prefill: str = "",
) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    """Completions of every row (episodes in ``episodes.env`` when given), their generated lengths and the samples
    their rewards read; sampled ones get seeds from (seed, prompt index, sample), so the same evaluation draws the
    same samples in any process and at any batch size."""
    texts: list[str] = []
    lengths: list[int] = []
    samples: list[dict[str, Any]] = []
    per_batch = max(1, batch_size // n)
    for start in range(0, len(rows), per_batch):
        chunk = rows[start : start + per_batch]
        seeds = None if sampling.greedy else [completion_seed(seed, start + p, g) for p in range(len(chunk)) for g in range(n)]
        rollout = complete(engine, tokenizer, chunk, n, sampling, seeds, episodes, prefill)
        texts += rollout.texts
        lengths += rollout.loss_mask.sum(dim=1).tolist()
        samples += scored_samples(chunk, n, rollout)
        bar.update(len(chunk))
    return texts, lengths, samples


def verifier_errors(scores: Scores) -> dict[str, str]:
    """The failed rewards that decide correctness of some row (the first reward that applies to it), with their
    error; a failed shaping reward listed after the verifier does not touch accuracy and is not named here."""
    applies = ~np.isnan(scores.columns)
    out = {}
    for i, name in enumerate(scores.names):
        if name in scores.errors and (~applies[:, :i].any(axis=1)).any():
            out[name] = scores.errors[name]
    return out


def _correct(scores: Scores) -> np.ndarray:
    """[N] bool: the correctness reward that applies to the row scored 1 (False where none applies)."""
    first = np.nan_to_num(scores.correctness(), nan=0.0)
    return first >= CORRECT


def sampled_metrics(texts: list[str], scores: Scores, n: int, ks: list[int]) -> dict[str, float | None]:
    """Unbiased pass@k and maj@k over ``n`` consecutive samples per prompt; None when a verifier failed."""
    failed = bool(verifier_errors(scores))
    correct = _correct(scores).reshape(-1, n)
    answers = np.array([extract_answer(t) for t in texts], dtype=object).reshape(-1, n)
    metrics: dict[str, float | None] = {}
    for k in sorted(set(ks)):
        if k > n:
            continue
        metrics[f"pass@{k}"] = None if failed else mean_pass_at_k(correct.tolist(), k)
        majority = [maj_at_k(a.tolist(), c.tolist(), k) for a, c in zip(answers, correct, strict=True)]
        metrics[f"maj@{k}"] = None if failed else float(np.mean(majority))
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
    seed: int = 0,
    progress: bool = False,
    episodes: Episodes | None = None,
    prefill: str = "",
) -> dict[str, Any]:
    """Greedy completions for every row (accuracy, reward means, the samples); with ``samples`` = n > 0 also
    n sampled completions per row for pass@k and maj@k. ``progress`` shows a bar over the prompts; ``episodes``
    makes every completion an episode in its environment."""
    rows = dataset.to_list()
    with tqdm(total=len(rows) * (2 if samples else 1), desc="eval", unit="prompt", disable=not progress, leave=False) as bar:
        greedy = SamplingParams(max_new_tokens, greedy=True)
        texts, lengths, scored = _generate(engine, tokenizer, rows, 1, greedy, batch_size, seed, bar, episodes, prefill)
        scores = score(texts, scored, rewards, reward_timeout)
        errors = verifier_errors(scores)
        first = scores.correctness()
        result: dict[str, Any] = {
            "accuracy": None if errors or np.isnan(first).all() else float(np.nanmean(first)),
            "rewards": scores.means(),
            "mean_length": float(np.mean(lengths)) if lengths else 0.0,
            "num_prompts": len(rows),
        }
        if samples > 0:
            bar.set_description(f"eval {samples} samples")
            sampling = sampling or SamplingParams(max_new_tokens)
            sampled_texts, _, sampled_rows = _generate(
                engine, tokenizer, rows, samples, sampling, batch_size, seed, bar, episodes, prefill
            )
            sampled_scores = score(sampled_texts, sampled_rows, rewards, reward_timeout)
            errors = {**verifier_errors(sampled_scores), **errors}
            result.update(sampled_metrics(sampled_texts, sampled_scores, samples, ks or [1]))
    result["verifier_errors"] = errors
    result["samples"] = [
        {
            "prompt": row["prompt"][-1]["content"], "completion": text, "answer": row.get("answer"),
            "rewards": dict(zip(scores.names, col.tolist(), strict=True)), **({"turns": row["turns"]} if "turns" in row else {}),
        }
        for row, text, col in zip(scored, texts, scores.columns, strict=True)
    ]
    return result


def evaluate_config(
    config: Any,
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    rewards: list[WeightedReward],
    progress: bool = False,
    episodes: Episodes | None = None,
) -> dict[str, Any]:
    """``evaluate`` with the settings of a run config (``run.eval_*`` and the ``eval`` section), in the config's
    ``precision``, which the result names; ``episodes`` is the run's environment (``Episodes.from_config``)."""
    run, ev = config.run, config.eval
    max_new = run.eval_max_new_tokens or config.rollout.max_new_tokens
    sampling = SamplingParams(max_new, ev.temperature, ev.top_p)
    used = precision(config)
    with _autocast(engine, used == "bf16"):
        result = evaluate(
            engine, tokenizer, dataset, rewards, max_new, run.eval_batch_size, run.reward_timeout, ev.samples, sampling, ev.k,
            eval_seed(config), progress and run.progress, episodes, config.rollout.prefill,
        )
    return {"precision": used, **result}


def fmt(value: float | None) -> str:
    """A metric for the terminal: three decimals, or "n/a" when it is missing."""
    return "n/a" if value is None else f"{value:.3f}"


def describe(result: dict[str, Any]) -> str:
    """One line: the held-out accuracy, on how many prompts, in which precision, and any failed verifier."""
    line = f"held-out accuracy {fmt(result['accuracy'])} on {result['num_prompts']} prompts ({result['precision']})"
    return "; ".join([line, *(f"verifier {name} failed: {error}" for name, error in result["verifier_errors"].items())])


def report_path(directory: Path, what: str, now: datetime | None = None) -> Path:
    """A report file in ``directory`` no earlier evaluation used: ``eval-<what>-<UTC time>.json`` (``what`` in
    characters safe in a file name), with a counter when two evaluations finish within the same second."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    stem = f"eval-{re.sub(r'[^A-Za-z0-9._-]+', '_', what).strip('_') or 'model'}-{stamp}"
    return next(path for i in itertools.count(1) if not (path := directory / f"{stem}{f'-{i}' if i > 1 else ''}.json").exists())


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``path``, a new file: an existing one is never replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as f:
        f.write(json.dumps(report, indent=2))
    return path
