"""The GRPO loop, the only stateful piece of rlreason.

One step: take P prompts -> sample G completions each (DAPO dynamic sampling: resample groups with no signal)
-> score them -> shape rewards (overlong, KL) -> group-relative advantages -> ``num_iterations`` optimizer steps
on the clipped surrogate (+ optional KL to a reference, entropy bonus), aggregated by per-token weights ->
log every completion and the step's metrics -> checkpoint. The objective's options are pure functions in
advantages.py and losses.py, chosen by name from ``train.*``.

Left out on purpose (see the README): value networks, reward models, and any advantage or loss not
selected by config; each stage is a pure function in its own module and is tested alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from rlreason.config import Config, ConfigError, save_config
from rlreason.data import PromptStream, encode_prompts, task_dataset
from rlreason.models import compile_decoder, load_model, load_tokenizer
from rlreason.objective.advantages import (
    compute_advantages,
    kl_penalised_rewards,
    overlong_penalty,
    zero_variance_groups,
)
from rlreason.objective.losses import high_entropy_mask, kl_divergence, policy_loss, token_weights
from rlreason.observe.evaluate import describe, eval_split, evaluate_config, policy_engine, precision
from rlreason.observe.reasoning import Milestones, length_stats, reasoning_stats, task_accuracy, token_counter
from rlreason.observe.runlog import (
    CHECKPOINT_DIR,
    CHECKPOINT_NAME,
    COMPLETIONS,
    CONFIG,
    EVALS,
    METRICS,
    RUN_OUTPUTS,
    Progress,
    RunLog,
    checkpoint_step,
    latest_checkpoint,
    read_jsonl,
    restart_logs,
    truncate_after,
)
from rlreason.rollout.engine import Rollout, SamplingParams, concat_rollouts
from rlreason.rollout.sampling import completion_seed
from rlreason.scoring import Scores, concat_scores, missing_fields, resolve_rewards, score
from rlreason.training import sft
from rlreason.training.logprobs import (
    EAGER_HEAD,
    LogprobInputs,
    compiled_head_math,
    logprob_inputs,
    logprobs_from_inputs,
)

log = logging.getLogger(__name__)


def run_inputs(config: Config) -> dict[str, Path]:
    """The files and directories the run reads, by config field: no overwrite may delete them."""
    named: dict[str, Any] = {"model.name": config.model.name, "sft.data": config.sft.data, "sample.teacher": config.sample.teacher}
    named |= {f"task.options.{key}": value for key, value in config.task.options.items()}
    for i, part in enumerate(config.task.mix):
        named |= {f"task.mix[{i}].options.{key}": value for key, value in (part.get("options") or {}).items()}
    return {
        field: Path(value).expanduser().resolve()
        for field, value in named.items()
        if isinstance(value, str) and value and Path(value).expanduser().exists()
    }


def remove_outputs(run_dir: Path, inputs: dict[str, Path]) -> None:
    """Delete the run outputs in ``run_dir`` (``RUN_OUTPUTS``, nothing else), after checking that none of them holds,
    or lies inside, an input of the new run; on such a conflict nothing is deleted."""
    outputs = [path for path in (run_dir / name for name in RUN_OUTPUTS) if path.exists()]
    for output in outputs:
        for field, source in inputs.items():
            if source.is_relative_to(output.resolve()) or output.resolve().is_relative_to(source):
                raise FileExistsError(
                    f"run.overwrite=true would delete {output}, and {field} ({source}) is read from there: "
                    "choose another run.output_dir"
                )
    for output in outputs:
        shutil.rmtree(output) if output.is_dir() else output.unlink()


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """Create the run directory; refuse to write over a run (any of its outputs, even of a run killed before its
    first step) unless asked to resume it or to replace it."""
    run_dir = Path(config.run.output_dir)
    holds_run = any((run_dir / name).exists() for name in RUN_OUTPUTS)
    if holds_run and not resume:
        if not config.run.overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run: pass --resume to continue it or set run.overwrite=true to replace it"
            )
        remove_outputs(run_dir, run_inputs(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def is_finished(run_dir: Path, steps: int) -> bool:
    """The run ran to its end: its latest checkpoint is at ``steps`` or later and its final evaluation is logged
    (a finished run resumed with more ``train.steps`` is not finished: it trains on)."""
    step = checkpoint_step(latest_checkpoint(run_dir))
    finals = {e["step"] for e in read_jsonl(run_dir / EVALS) if e.get("stage") == "final"}
    return step is not None and step >= steps and step in finals


@dataclass(frozen=True)
class TokenMean:
    """A per-token metric as its sum and its token count, so that micro-batches and processes add up to the mean over
    the step's tokens (a mean of micro-batch means would depend on how rows were split)."""

    total: float
    tokens: float

    def __add__(self, other: TokenMean) -> TokenMean:
        return TokenMean(self.total + other.total, self.tokens + other.tokens)

    @property
    def value(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


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


def _values(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: value.value if isinstance(value, TokenMean) else value for key, value in stats.items()}


class TrainingDiverged(RuntimeError):
    """Too many consecutive updates were non-finite for the run to be worth continuing."""


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        tr = config.train
        use_bf16 = precision(config) == "bf16"
        # cpu=True on GPU-less machines: without it accelerate ignores the launcher's WORLD_SIZE and each
        # process would train alone
        self.accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if config.rollout.prompts_per_step % self.world:
            raise ConfigError([
                f"rollout.prompts_per_step: {config.rollout.prompts_per_step} prompts cannot be split into whole groups "
                f"over {self.world} processes; use a multiple of {self.world}"
            ])
        self.run_dir = prepare_run_dir(config, resume) if self.is_main else Path(config.run.output_dir)
        self.accelerator.wait_for_everyone()
        set_seed(tr.seed)

        # data and rewards first: a dataset that cannot be scored is refused before any model loads
        self.rewards = resolve_rewards(config.rewards)
        tc = config.task
        self.train_data = task_dataset(tc, "train", tr.seed)
        self.eval_data = eval_split(config)
        problems = missing_fields(self.rewards, self.train_data.column_names, "+".join(m["name"] for m in tc.mix) or tc.name)
        if problems:
            raise ConfigError(problems)

        mc = config.model
        self.tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
        model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision)
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.head_math = EAGER_HEAD
        if tr.compile:
            compile_decoder(model, mode="reduce-overhead" if tr.cuda_graphs else None)
            self.head_math = compiled_head_math()
        # fused on CUDA: the update in one multi-tensor kernel instead of a dozen foreach ones. The model is still on
        # the CPU here; accelerate moves it below, before the first step, which is when AdamW checks the devices.
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tr.learning_rate, betas=tuple(tr.adam_betas), weight_decay=tr.weight_decay,
            fused=True if self.accelerator.device.type == "cuda" else None,
        )
        # Not prepared by accelerate: its wrapper steps once per process, which would shorten warm-up.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (tr.warmup_steps + 1)))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.reference = None
        if tr.beta > 0:
            self.reference = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to(self.accelerator.device)
            self.reference.eval().requires_grad_(False)

        self.engine = policy_engine(config, self.accelerator.unwrap_model(self.model), self.tokenizer)
        self.sampling = SamplingParams(
            config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p, config.rollout.top_k
        )
        self.stream = PromptStream(len(self.train_data), tr.seed)
        self.step = 0
        self.runlog = RunLog(self.run_dir, self.is_main, config.run.report_to, config.to_dict())
        if self.is_main:
            save_config(config, self.run_dir / CONFIG)
        self.resumed_from = self._resume() if resume else None
        self.accelerator.wait_for_everyone()  # the logs are cut back before any process reads them

    # ---------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Cold start (optional), evaluate, GRPO for ``train.steps``, evaluate; returns the summary. A resumed run that
        had already finished is left as it is."""
        try:
            if self.resumed_from is not None and is_finished(self.run_dir, self.config.train.steps):
                self._say(f"{self.run_dir} is finished (step {self.step}); nothing to resume (raise train.steps to train on)")
            else:
                self._train()
        finally:  # also on Ctrl-C: the wandb mirror is closed, the JSONL logs are complete up to the last line
            self.runlog.close()
        return self.summary()

    def _train(self) -> None:
        cfg = self.config
        if self.resumed_from is None:
            if cfg.run.eval_before:
                self.evaluate("base")
            if cfg.sft.data and cfg.sft.steps > 0:
                self.run_sft()
                self.evaluate("sft")
        milestones = Milestones(cfg.run.milestones, read_jsonl(self.run_dir / METRICS))
        progress = Progress(cfg.train.steps, self.step, cfg.run.progress, cfg.run.log_every, milestones, self.is_main)
        try:
            self._grpo(progress)
        finally:  # the bar ends its line before any message that follows (Ctrl-C's, a divergence's)
            progress.close()
        if checkpoint_step(latest_checkpoint(self.run_dir)) != self.step:  # run.save_every may have saved it already
            self.save_checkpoint()
        self.evaluate("final")

    def _grpo(self, progress: Progress) -> None:
        """GRPO steps up to ``train.steps``, with the evaluations and checkpoints ``run.*`` asks for."""
        cfg = self.config
        bad_steps = 0
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            progress.update(metrics)
            bad_steps = bad_steps + 1 if metrics["skipped_updates"] else 0
            if bad_steps >= cfg.train.max_bad_steps:
                last = latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"{bad_steps} steps in a row ended with a non-finite loss or gradient (last at step {self.step}); "
                    f"the weights were not updated by them. Last good checkpoint: {last or 'none saved yet'}. "
                    "Lower train.learning_rate or check the rewards, then resume with --resume."
                )
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate("grpo")
            if cfg.run.save_every and self.step % cfg.run.save_every == 0:
                self.save_checkpoint()

    def _say(self, line: str) -> None:
        """A line for the person running the command (stderr, main process only), not a log record."""
        if self.is_main:
            tqdm.write(line, file=sys.stderr)

    def run_sft(self) -> list[float]:
        """The cold start: supervised steps on ``sft.data`` before any RL."""
        cfg = self.config
        conversations = sft.load_chat_jsonl(cfg.sft.data)
        return sft.run_sft(self.model, self.tokenizer, conversations, cfg.sft, self.accelerator, cfg.train.seed, cfg.run.progress and self.is_main)

    def train_step(self) -> dict[str, Any]:
        cfg = self.config
        P, G = cfg.rollout.prompts_per_step // self.world, cfg.rollout.group_size  # this process's groups
        t0 = time.perf_counter()
        rows, rollout, scores, sampling = self._sample_groups(P, G)
        t_generate = time.perf_counter() - sampling.pop("time_score")

        samples = [row for row in rows for _ in range(G)]
        rewards = torch.tensor(scores.total, dtype=torch.float32).view(P, G)
        t_score = time.perf_counter()

        inputs = self._model_inputs(rollout)
        frozen = self._frozen_pass(rollout, inputs)
        advantages, shaping = self._advantages(rewards, rollout, frozen)
        stats = {**sampling, **shaping, **self.optimize(rollout, advantages, frozen, inputs)}
        t_end = time.perf_counter()
        self.step += 1

        lengths = rollout.completion_mask.sum(dim=1).float()
        texts, truncated, tokens = rollout.texts, rollout.truncated, rollout.num_completion_tokens
        if self.world > 1:  # log the whole step once: every process's groups, in process order
            samples, texts, scores, advantages, lengths, truncated, stats, tokens = self._gather_step(
                samples, texts, scores, advantages, lengths, truncated, stats, tokens
            )
            rewards = torch.tensor(scores.total, dtype=torch.float32).view(-1, G)
        stats = _values(stats)
        first = scores.correctness()
        metrics = {
            "step": self.step,
            "reward": float(scores.total.mean()),
            "reward_std": float(scores.total.std()),
            **{f"rewards/{name}": value for name, value in scores.means().items()},
            "accuracy": float(np.nanmean(first)) if not np.isnan(first).all() else 0.0,
            **task_accuracy([s.get("task") for s in samples], first),
            "zero_std_groups": float((rewards.std(dim=1) == 0).float().mean()),
            **length_stats(lengths.tolist(), truncated.tolist()),
            **reasoning_stats(texts, lengths.tolist(), cfg.run.reflection_phrases, token_counter(self.tokenizer)),
            **stats,
            "lr": self.scheduler.get_last_lr()[0],
            "processes": self.world,
            "reward_failures": sum(scores.failures.values()),
            "time_generate": t_generate - t0,
            "time_score": t_score - t_generate,
            "time_optimize": t_end - t_score,
            "time_step": t_end - t0,
            "tokens_per_s": tokens / (t_end - t0),
        }
        self.runlog.metrics(metrics)
        self.runlog.completions(
            [
                {
                    "step": self.step,
                    "task": sample.get("task"),
                    "prompt": sample["prompt"][-1]["content"],
                    "answer": sample.get("answer"),
                    "completion": text,
                    "rewards": dict(zip(scores.names, column.tolist(), strict=True)),
                    "total": float(total),
                    "advantage": float(advantage),
                    "length": int(length),
                    "truncated": bool(truncated),
                }
                for sample, text, column, total, advantage, length, truncated in zip(
                    samples, texts, scores.columns, scores.total, advantages.tolist(), lengths.tolist(), truncated.tolist(), strict=True
                )
            ]
        )
        return metrics

    def _gather_step(
        self, samples: list, texts: list[str], scores: Scores, advantages: torch.Tensor, lengths: torch.Tensor,
        truncated: torch.Tensor, stats: dict[str, Any], tokens: int,
    ) -> tuple[list, list[str], Scores, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any], int]:
        """Every process's share of the step, concatenated in process order; stats merged (``merge_process_stats``)."""
        local = (samples, texts, scores, advantages.tolist(), lengths.tolist(), truncated.tolist(), stats, tokens)
        parts = gather_object([local])

        def cat(i: int) -> list:
            return [item for part in parts for item in part[i]]

        merged = concat_scores([(p[2], slice(None)) for p in parts], [p[2] for p in parts])
        return (
            cat(0), cat(1), merged, torch.tensor(cat(3)), torch.tensor(cat(4)), torch.tensor(cat(5)),
            merge_process_stats([p[6] for p in parts]),
            sum(p[7] for p in parts),
        )

    def _sample_groups(self, P: int, G: int) -> tuple[list[dict[str, Any]], Rollout, Scores, dict[str, float]]:
        """P prompts (rows), G scored completions each, and the sampling stats.

        With ``train.dynamic_sampling`` (DAPO) a group whose rewards are all equal has zero advantage and teaches
        nothing: it is dropped and prompts are sampled for the missing groups, for at most ``max_sampling_rounds``
        rounds; a batch still short then is filled with dropped groups, so it always holds P groups.
        """
        tr = self.config.train
        kept, dropped, rounds, score_time = [], [], 0, 0.0
        while rounds < (tr.max_sampling_rounds if tr.dynamic_sampling else 1):
            # Every process draws the same prompts from the shared stream and samples its own share, so the
            # data order, and each completion's seed, do not depend on the number of processes.
            missing = gather_object([P - len(kept)])
            if not sum(missing):
                break
            rounds += 1
            first_draw = self.stream.position
            drawn = self.stream.take(sum(missing))
            mine = range(sum(missing[: self.rank]), sum(missing[: self.rank + 1]))
            if not mine:
                continue
            rows = [self.train_data[drawn[i]] for i in mine]
            seeds = [completion_seed(tr.seed, first_draw + i, g) for i in mine for g in range(G)]
            rollout = self.engine.generate(encode_prompts(self.tokenizer, rows), G, self.sampling, seeds)
            start = time.perf_counter()
            scores = score(rollout.texts, [row for row in rows for _ in range(G)], self.rewards, self.config.run.reward_timeout)
            score_time += time.perf_counter() - start
            if not tr.dynamic_sampling:
                return rows, rollout, scores, {"time_score": score_time}
            flat = zero_variance_groups(torch.tensor(scores.total).view(len(rows), G))
            for g, row in enumerate(rows):
                (dropped if flat[g] else kept).append((row, rollout, scores, range(g * G, g * G + G)))
        refill = dropped[: P - len(kept)]
        batch = kept + refill
        calls = list({id(s): s for *_, s, _ in kept + dropped}.values())
        scores = concat_scores([(s, list(r)) for *_, s, r in batch], calls)
        rollout = concat_rollouts([(r, list(idx)) for _, r, _, idx in batch], self.tokenizer.pad_token_id)
        stats = {
            "dynamic_sampling/rounds": rounds,
            "dynamic_sampling/dropped_groups": len(dropped),
            "dynamic_sampling/refilled_groups": len(refill),
        }
        return [row for row, *_ in batch], rollout, scores, {**stats, "time_score": score_time}

    def _frozen_pass(self, rollout: Rollout, inputs: list[LogprobInputs]) -> dict[str, torch.Tensor]:
        """What the step needs from models that are not being updated, computed once per batch: the sampling
        policy's log-probs and entropy ("old", "entropy": for num_iterations > 1, the KL in the reward, the
        top-entropy tokens) and the reference's log-probs ("ref")."""
        tr, frozen = self.config.train, {}
        if tr.rollout_logprobs and rollout.logprobs is not None and tr.top_entropy_quantile == 1:
            frozen["old"] = rollout.logprobs  # recorded while sampling: no forward pass
        elif tr.num_iterations > 1 or tr.kl_in_reward or tr.top_entropy_quantile < 1:
            frozen["old"], frozen["entropy"] = self._frozen_logprobs(self.model, rollout, inputs)
        if self.reference is not None:
            frozen["ref"], _ = self._frozen_logprobs(self.reference, rollout, inputs)
        return frozen

    def _advantages(self, rewards: torch.Tensor, rollout: Rollout, frozen: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Rewards [P, G] -> one advantage per completion [P * G], after the reward shaping the config asks for."""
        tr, stats = self.config.train, {}
        mask = rollout.completion_mask.float()
        if tr.overlong == "soft":  # DAPO's soft overlong punishment
            penalty = overlong_penalty(mask.sum(dim=1), self.config.rollout.max_new_tokens, tr.overlong_buffer)
            rewards = rewards + penalty.view_as(rewards)
            stats.update({"overlong/penalized": int((penalty < 0).sum()), "overlong/penalty": float(penalty.mean())})
        if tr.kl_in_reward:  # KL folded into the reward instead of the loss
            kl = kl_divergence(frozen["old"], frozen["ref"], tr.kl_estimator)
            rewards = kl_penalised_rewards(rewards, kl, mask, tr.beta)
            stats["kl"] = TokenMean(float((kl * mask).sum()), float(mask.sum()))
        return compute_advantages(rewards, tr.advantage, tr.scale_rewards).flatten(), stats

    def optimize(
        self, rollout: Rollout, advantages: torch.Tensor, frozen: dict[str, torch.Tensor], inputs: list[LogprobInputs]
    ) -> dict[str, Any]:
        """``num_iterations`` optimizer steps over the batch, each accumulating gradients over micro-batches.

        ``frozen`` is ``_frozen_pass(rollout, inputs)``; ``inputs`` is ``_model_inputs(rollout)``, already on the
        device, so the loop below never waits on the host. Per-token stats are ``TokenMean``s over every iteration's
        tokens.
        """
        tr = self.config.train
        temperature = self.config.rollout.temperature
        # Which tokens train and how much each weighs: once per batch, so that the micro-batches add up.
        loss_mask = rollout.completion_mask.float()
        if tr.overlong == "mask":  # DAPO's overlong filtering: truncated completions are left out of the loss
            loss_mask = loss_mask * ~rollout.truncated.unsqueeze(1)
        weights = self._token_weights(loss_mask)
        if tr.top_entropy_quantile < 1:  # only the batch's highest-entropy tokens train
            weights = weights * high_entropy_mask(frozen["entropy"], loss_mask, tr.top_entropy_quantile)
        kl_in_loss = tr.beta > 0 and not tr.kl_in_reward
        micro_batches = self._micro_batches(len(advantages))
        device = self.accelerator.device
        advantages, weights = advantages.to(device), weights.to(device)
        old = frozen["old"].to(device) if tr.num_iterations > 1 else None
        ref = frozen["ref"].to(device) if kl_in_loss else None
        losses: list[torch.Tensor] = []
        sums: dict[str, torch.Tensor] = {}  # name -> [sum over tokens, tokens], on the device

        def add(name: str, values: torch.Tensor, where: torch.Tensor) -> None:
            pair = torch.stack([(values.float() * where).sum(), where.sum()])
            sums[name] = sums[name] + pair if name in sums else pair

        grad_norms: list[float] = []
        skipped = 0
        self.model.train()
        if tr.cuda_graphs:  # a graph's outputs (gradients too) are overwritten at its next replay: accumulate elsewhere
            for p in self.model.parameters():  # (every step: the cold-start SFT, for one, leaves them None)
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        for _ in range(tr.num_iterations):
            for i, (mb, batch) in enumerate(zip(micro_batches, inputs, strict=True)):
                sync = i == len(micro_batches) - 1
                width = batch.completion_width
                if tr.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # nothing of the last micro-batch's replay is needed
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                    logprobs, entropy = logprobs_from_inputs(
                        self.model, batch, temperature=temperature, entropy_grad=tr.entropy_coef != 0, head_math=self.head_math
                    )
                    mask = batch.completion_mask.to(logprobs.dtype)
                    # one pass over a batch sampled from this very policy: the ratio is exactly 1, nothing clips
                    old_lp = old[mb, :width] if old is not None else logprobs.detach()
                    per_token, stats = policy_loss(
                        logprobs,
                        old_lp,
                        advantages[mb],
                        mask,
                        importance_sampling=tr.importance_sampling,
                        epsilon_low=tr.epsilon,
                        epsilon_high=tr.epsilon_high,
                        dual_clip=tr.dual_clip,
                        beta=tr.beta if kl_in_loss else 0.0,
                        ref_logprobs=ref[mb, :width] if ref is not None else None,
                        kl_estimator=tr.kl_estimator,
                        entropy=entropy,
                        entropy_coef=tr.entropy_coef,
                    )
                    w = weights[mb, :width]
                    loss = (per_token * w).sum()
                    self.accelerator.backward(loss)
                trained = (w > 0).float()
                # statistics stay on the device (a float() here would stall the GPU once per micro-batch)
                losses.append(loss.detach())
                for name in ("clipped", "clipped_low", "clipped_high", "clipped_dual"):
                    if name in stats:
                        add(name.replace("clipped", "clip_fraction"), stats[name], trained)
                add("ratio", stats["ratio"], mask)
                add("entropy", entropy.detach(), mask)
                if "kl" in stats:
                    add("kl", stats["kl"], mask)
            # the norm is computed (and clipping skipped) with an infinite threshold when clipping is off
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), tr.max_grad_norm or float("inf")))
            if math.isfinite(grad_norm) and bool(torch.isfinite(torch.stack(losses[-len(micro_batches) :])).all()):
                grad_norms.append(grad_norm)
                self.optimizer.step()
                self.scheduler.step()
            else:  # a NaN/inf update would poison the weights for good: drop it, count it, say so
                skipped += 1
                log.warning("step %d: non-finite loss or gradient norm (%s), update skipped", self.step + 1, grad_norm)
            self.optimizer.zero_grad(set_to_none=not tr.cuda_graphs)
        out: dict[str, Any] = {name: TokenMean(*pair.tolist()) for name, pair in sums.items()}
        if grad_norms:
            out["grad_norm"] = float(np.mean(grad_norms))
        out["skipped_updates"] = float(skipped)
        out["loss"] = float(torch.stack(losses).sum()) / tr.num_iterations
        if tr.overlong == "mask" or tr.top_entropy_quantile < 1:
            out["trained_token_fraction"] = TokenMean(float((weights > 0).sum()), float(rollout.completion_mask.sum()))
        if tr.overlong == "mask":
            out["overlong/masked"] = int(rollout.truncated.sum())
        if tr.ref_update_every and (self.step + 1) % tr.ref_update_every == 0:  # self.step + 1: the step ending now
            self._refresh_reference()
        return out

    def _token_weights(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """``token_weights`` over the batch of all processes, this process's rows of it.

        The aggregation's divisors (sequences, tokens) count the whole batch, and the weights are multiplied by
        the number of processes because data-parallel training averages their gradients.
        """
        tr, max_len = self.config.train, self.config.rollout.max_new_tokens
        if self.world == 1:
            return token_weights(loss_mask, tr.loss_type, max_len)
        padded = self.accelerator.pad_across_processes(loss_mask.to(self.accelerator.device), dim=1)
        everyone = token_weights(self.accelerator.gather(padded).cpu(), tr.loss_type, max_len)
        rows = slice(self.rank * len(loss_mask), (self.rank + 1) * len(loss_mask))
        return everyone[rows, : loss_mask.shape[1]] * self.world

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.config.train.micro_batch_size
        return [slice(s, s + size) for s in range(0, n, size)]

    @torch.no_grad()
    def _refresh_reference(self) -> None:
        """Reset the reference to the current policy (``train.ref_update_every``)."""
        self.reference.load_state_dict(self.accelerator.unwrap_model(self.model).state_dict())

    def _model_inputs(self, rollout: Rollout) -> list[LogprobInputs]:
        """Each micro-batch's model inputs, laid out on the CPU (columns that are padding in every row cut away)
        and sent to the device without waiting for it: once a step, for the frozen passes and the updates."""
        tr, out = self.config.train, []
        for rows in self._micro_batches(len(rollout.texts)):
            prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
            first = int((prompt_mask.sum(dim=0) > 0).nonzero()[0])
            width = max(int(completion_mask.sum(dim=1).max()), 1)
            inputs = logprob_inputs(
                rollout.prompt_ids[rows, first:], prompt_mask[:, first:], rollout.completion_ids[rows, :width],
                completion_mask[:, :width], packing=tr.packing, shared_prompt=tr.shared_prompt,
                # train.cuda_graphs: one graph per 64-token bucket of row widths, padding columns after the completions
                width_multiple=64 if tr.cuda_graphs else 1, pad_id=self.tokenizer.pad_token_id,
            )
            out.append(inputs.to(self.accelerator.device))
        return out

    @torch.no_grad()
    def _frozen_logprobs(self, model: Any, rollout: Rollout, inputs: list[LogprobInputs]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy of the batch under a model that is not being updated now (old policy or reference)."""
        device = self.accelerator.device
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=device)
        entropy = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=device)
        for mb, batch in zip(self._micro_batches(len(rollout.texts)), inputs, strict=True):
            with self.accelerator.autocast():  # the reference is not prepared: give it the policy's precision
                logprobs, ent = logprobs_from_inputs(model, batch, temperature=self.config.rollout.temperature, head_math=self.head_math)
            out[mb, : logprobs.shape[1]] = logprobs.float()
            entropy[mb, : ent.shape[1]] = ent.float()
        return out.cpu(), entropy.cpu()

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, stage: str) -> dict[str, Any]:
        """Greedy accuracy on the held-out split; logged to evals.jsonl with its samples."""
        result = evaluate_config(self.config, self.engine, self.tokenizer, self.eval_data, self.rewards, progress=self.is_main)
        self.runlog.evaluation({"step": self.step, "stage": stage, **result})
        if self.is_main:
            tqdm.write(f"[eval {stage} @ step {self.step}] {describe(result)}")
        return result

    def summary(self) -> dict[str, Any]:
        """Held-out accuracy at each evaluated stage, written to summary.json."""
        evals = read_jsonl(self.run_dir / EVALS)
        summary = {"steps": self.step, "accuracy": {f"{e['stage']}@{e['step']}": e["accuracy"] for e in evals}}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` under a temporary name and rename it, so a partial one is never resumed."""
        final = self.run_dir / CHECKPOINT_DIR / f"step-{self.step:06d}"
        partial = final.with_name(final.name + ".tmp")
        self.accelerator.wait_for_everyone()
        weights = self.accelerator.get_state_dict(self.model)  # collective: full weights even when sharded
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(partial / "model", state_dict=weights)
            if self.reference is not None and self.config.train.ref_update_every:  # the reference moves: keep it
                self.reference.save_pretrained(partial / "reference")
            self.tokenizer.save_pretrained(partial / "model")
            torch.save(
                {
                    "step": self.step,
                    "position": self.stream.position,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                partial / "trainer_state.pt",
            )
        self.accelerator.wait_for_everyone()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, partial / f"rng-{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            kept = sorted((p for p in final.parent.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name)), key=lambda p: p.name)
            for old in kept[: -self.config.run.keep_last]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> Path | None:
        """Restore model, optimizer, scheduler, data position and RNG from the latest complete checkpoint, and cut the
        logs back to its step; with no checkpoint, start over with empty logs."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            if self.is_main:
                restart_logs(self.run_dir)
            self._say(f"--resume: no checkpoint in {self.run_dir} yet, so the run starts over (its logs are restarted)")
            return None
        weights = AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict()
        self.accelerator.unwrap_model(self.model).load_state_dict(weights)
        if self.reference is not None and (checkpoint / "reference").is_dir():
            self.reference.load_state_dict(AutoModelForCausalLM.from_pretrained(checkpoint / "reference").state_dict())
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.stream.position = state["step"], state["position"]
        rng = torch.load(checkpoint / f"rng-{self.accelerator.process_index}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            for name in (METRICS, COMPLETIONS, EVALS):
                truncate_after(self.run_dir / name, self.step)
        self._say(f"resuming from {checkpoint} (step {self.step} of {self.config.train.steps})")
        return checkpoint
