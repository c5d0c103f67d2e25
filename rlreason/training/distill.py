"""The last stage of the R1 recipe: rejection sampling from a teacher, then SFT of a student on what passed.

``rejection_sample``: n completions per prompt of the task's train split (never the held-out split, so the
student's evaluation stays clean), scored by the configured rewards; a completion is verified when the first
reward (the task's correctness verifier, as in evaluation) scores 1 and it ended on its own (a completion cut at
max_new_tokens is not a finished answer). The kept ones are written as chat JSONL that ``rlreason sft`` reads,
each line with its provenance: teacher model and step, rewards, sample index.

``fine_tune``: SFT with a held-out evaluation before and after (``rlreason sft``); ``distill`` chains the two.
The data is text, so the student may use another tokenizer: ``sft`` re-tokenizes it.

Left out (R1 did more): filtering by a reward model or by readability and language consistency, and mixing in
non-reasoning data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlreason.config import Config, ConfigError
from rlreason.data import encode_prompts
from rlreason.models import load_model, load_tokenizer
from rlreason.observe.evaluate import CORRECT
from rlreason.observe.runlog import SFT_MODEL_DIR, latest_checkpoint
from rlreason.rollout.engine import RolloutEngine, SamplingParams
from rlreason.rollout.fast import build_engine
from rlreason.rollout.sampling import completion_seed
from rlreason.scoring import Scores, WeightedReward, resolve_rewards, score
from rlreason.training.checkpoint import prepare_run_dir
from rlreason.training.trainer import Trainer
from tasks.registry import load_task

SAMPLES_FILE = "samples.jsonl"


def run_model(run_dir: Path) -> tuple[Path | None, int | None]:
    """The weights a run directory stands for: its latest checkpoint and that step, else its SFT model (step
    None), else (None, None)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        return checkpoint / "model", int(checkpoint.name.split("-")[1])
    if (run_dir / SFT_MODEL_DIR).is_dir():
        return run_dir / SFT_MODEL_DIR, None
    return None, None


def keep_indices(texts: list[str], verified: list[bool], totals: list[float], keep: str) -> list[int]:
    """Which of one prompt's completions become data: every distinct verified one ("all"), the verified one with
    the highest total reward ("best", earliest on ties) or the shortest in characters ("shortest": a length that
    does not depend on any tokenizer)."""
    seen: set[str] = set()
    candidates = []
    for i, (text, ok) in enumerate(zip(texts, verified, strict=True)):
        if ok and text.strip() not in seen:
            seen.add(text.strip())
            candidates.append(i)
    if keep == "all" or not candidates:
        return candidates
    if keep == "best":
        return [max(candidates, key=lambda i: (totals[i], -i))]
    if keep == "shortest":
        return [min(candidates, key=lambda i: (len(texts[i]), i))]
    raise ValueError(f"keep must be 'all', 'best' or 'shortest', got {keep!r}")


def generate_and_score(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    rewards: list[WeightedReward],
    n: int,
    sampling: SamplingParams,
    batch_size: int,
    seed: int = 0,
    timeout: float | None = None,
    progress: bool = True,
) -> tuple[list[str], np.ndarray, Scores]:
    """``n`` completions per row (grouped: row i owns ``i * n .. i * n + n - 1``), whether each was truncated, and
    their scores. Each completion has its own seed, so the dataset does not depend on ``batch_size``."""
    texts: list[str] = []
    truncated: list[bool] = []
    per_batch = max(1, batch_size // n)
    for start in tqdm(range(0, len(rows), per_batch), desc="sample", unit="batch", disable=not progress):
        chunk = rows[start : start + per_batch]
        seeds = [completion_seed(seed, start + p, g) for p in range(len(chunk)) for g in range(n)]
        rollout = engine.generate(encode_prompts(tokenizer, chunk), n, sampling, seeds)
        texts += rollout.texts
        truncated += rollout.truncated.tolist()
    return texts, np.array(truncated, dtype=bool), score(texts, [row for row in rows for _ in range(n)], rewards, timeout)


def verified(scores: Scores, truncated: np.ndarray) -> np.ndarray:
    """[N] bool: the first reward scored 1 and the completion ended on its own."""
    first = np.nan_to_num(scores.columns[:, 0], nan=0.0) if scores.columns.shape[1] else np.zeros(len(truncated))
    return (first >= CORRECT) & ~truncated


def build_records(
    rows: list[dict[str, Any]], texts: list[str], truncated: np.ndarray, scores: Scores, n: int, keep: str, source: dict[str, Any]
) -> list[dict[str, Any]]:
    """The chat-JSONL lines of the kept completions, each with its rewards and ``source`` (provenance) plus the
    completion's index among its prompt's n samples."""
    passed = verified(scores, truncated)
    records = []
    for p, row in enumerate(rows):
        group = slice(p * n, p * n + n)
        for i in keep_indices(texts[group], passed[group].tolist(), scores.total[group].tolist(), keep):
            j = p * n + i
            records.append(
                {
                    "messages": [*row["prompt"], {"role": "assistant", "content": texts[j]}],
                    "task": row.get("task"),
                    "answer": row.get("answer"),
                    "rewards": {k: None if np.isnan(v) else float(v) for k, v in zip(scores.names, scores.columns[j], strict=True)},
                    "total": float(scores.total[j]),
                    "source": {**source, "sample": i},
                }
            )
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a half-written dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    partial.rename(path)


def rejection_sample(config: Config, out: Path, step: int | None = None) -> dict[str, Any]:
    """Sample ``sample.n`` completions per train prompt from ``model.name``, keep the verified ones (``sample.keep``),
    write them to ``out``; returns counts. ``step`` is the teacher's training step, for provenance."""
    mc, tc, sc = config.model, config.task, config.sample
    if out.exists() and not config.run.overwrite:
        raise FileExistsError(f"{out} already exists: set run.overwrite=true to replace it")
    tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
    model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to("cuda" if torch.cuda.is_available() else "cpu")
    rows = load_task(tc.name, "train", sc.prompts or tc.train_size, config.train.seed, **tc.options).to_list()
    sampling = SamplingParams(sc.max_new_tokens or config.rollout.max_new_tokens, sc.temperature, sc.top_p)
    rewards = resolve_rewards(config.rewards)
    engine = build_engine(config.rollout.engine, model, tokenizer)
    texts, truncated, scores = generate_and_score(
        engine, tokenizer, rows, rewards, sc.n, sampling, sc.batch_size, config.train.seed, config.run.reward_timeout, config.run.progress
    )
    if scores.columns.shape[1] and np.isnan(scores.columns[:, 0]).all():
        raise ConfigError([f"rewards[0]: {config.rewards[0].name!r} does not apply to task {tc.name!r}, so nothing can be verified"])
    source = {"model": mc.name, "step": step, "n": sc.n, "keep": sc.keep, "temperature": sc.temperature}
    records = build_records(rows, texts, truncated, scores, sc.n, sc.keep, source)
    write_jsonl(out, records)
    return {
        "model": mc.name,
        "step": step,
        "prompts": len(rows),
        "completions": len(texts),
        "verified": int(verified(scores, truncated).sum()),
        "truncated": int(truncated.sum()),
        "kept": len(records),
        "prompts_kept": len({json.dumps(r["messages"][:-1]) for r in records}),
        "out": str(out),
    }


def claim_run_dir(config: Config) -> Path:
    """The run directory of an SFT run: refused when it holds a run already, unless run.overwrite, which deletes
    that run's outputs (and nothing else: the SFT data may live there)."""
    return prepare_run_dir(config, resume=False)


def fine_tune(config: Config) -> dict[str, Any]:
    """SFT on ``sft.data`` with held-out accuracy before (``run.eval_before``) and after; saves the model to
    ``<run dir>/sft-model``, which ``rlreason eval|sample RUN_DIR`` load. Returns the accuracies and losses."""
    if not config.sft.data or config.sft.steps < 1:
        raise ConfigError(["sft.data and sft.steps >= 1 are needed to run sft"])
    claim_run_dir(config)
    trainer = Trainer(config)
    if config.run.eval_before:
        trainer.evaluate("base")
    losses = trainer.run_sft()
    trainer.evaluate("sft")
    out = trainer.run_dir / SFT_MODEL_DIR
    if trainer.is_main:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out)
        trainer.tokenizer.save_pretrained(out)
    trainer.runlog.close()
    return {**trainer.summary(), "loss": [losses[0], losses[-1]], "model": str(out)}


def resolve_teacher(spec: str) -> tuple[str, int | None]:
    """``sample.teacher`` as a model name and its training step: a run directory's newest weights, or ``spec`` itself
    (a model directory, .gguf file, hub id or "default")."""
    path = Path(spec)
    if path.is_dir() and (path / "config.yaml").is_file():
        model, step = run_model(path)
        if model is None:
            raise ConfigError([f"sample.teacher: run directory {spec} holds no checkpoint and no {SFT_MODEL_DIR}"])
        return str(model), step
    if not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir():  # a local path, not a hub id
        raise ConfigError([f"sample.teacher: {spec} does not exist"])
    return spec, None


def distill(config: Config) -> dict[str, Any]:
    """Teacher (``sample.teacher``: run directory or model) -> rejection sampling on the train split -> SFT of
    ``model.name`` on the kept completions -> held-out evaluation."""
    sc = config.sample
    problems = [] if sc.teacher else ["sample.teacher: the teacher's run directory or model is needed to distill"]
    if config.sft.steps < 1:
        problems.append("sft.steps: must be >= 1 to train the student")
    if problems:
        raise ConfigError(problems)
    teacher, step = resolve_teacher(sc.teacher)
    run_dir = claim_run_dir(config)
    out = Path(sc.out or run_dir / SAMPLES_FILE)
    teacher_model = dataclasses.replace(config.model, name=teacher, revision=None)
    stats = rejection_sample(dataclasses.replace(config, model=teacher_model), out, step)
    if not stats["kept"]:
        raise ConfigError([f"sample: the teacher {teacher} got no completion verified on {stats['prompts']} prompts; nothing to train on"])
    student = dataclasses.replace(config, sft=dataclasses.replace(config.sft, data=str(out)))
    return {"sample": stats, **fine_tune(student)}
