"""The GRPO loop, the only stateful piece of rlreason, and blind to the algorithm it runs.

One step: take P prompts -> sample G completions each (DAPO dynamic sampling: resample groups with no signal)
-> score them -> shape rewards -> group-relative advantages -> ``num_iterations`` optimizer steps on the per-token
loss of the completions that have a gradient, aggregated by the whole batch's per-token weights -> log every
completion and the step's metrics -> checkpoint. Every choice of the objective (which frozen passes a step needs,
reward shaping, token weights, which completions have a gradient, the loss and its metrics) is the ``Objective``'s
(rlreason/objective/objective.py), built once from the config; this loop never reads its options.

Left out on purpose (see the README): value networks, reward models, and any advantage or loss not
selected by config; each stage is a pure function in its own module and is tested alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from rlreason.config import Config, ConfigError, save_config
from rlreason.data import PromptStream
from rlreason.objective.objective import FrozenPass, Objective, TokenMean, TokenWeights
from rlreason.observe.evaluate import describe, evaluate_config, policy_engine
from rlreason.observe.reasoning import Milestones, token_counter
from rlreason.observe.runlog import (
    CONFIG,
    METRICS,
    Progress,
    RunLog,
    checkpoint_step,
    latest_checkpoint,
    read_jsonl,
    restart_logs,
)
from rlreason.rollout.engine import Rollout, SamplingParams, concat_rollouts
from rlreason.rollout.episodes import Episodes
from rlreason.training import interrupt, sft
from rlreason.training.checkpoint import (
    Checkpointed,
    full_weights,
    is_finished,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    write_summary,
)
from rlreason.training.groups import (
    GroupSampler,
    SampledBatch,
    aggregate_over_processes,
    frozen_logprobs,
    micro_batches,
    model_inputs,
    update_rows,
)
from rlreason.training.logprobs import LogprobInputs, logprobs_from_inputs
from rlreason.training.packed_products import packed_products
from rlreason.training.prefetch import BatchPrefetcher
from rlreason.training.setup import load_training_data, load_training_models, make_accelerator
from rlreason.training.step_log import (
    ReasoningInputs,
    StepRecord,
    StepTimes,
    TokenSums,
    completion_rows,
    gather_step,
    metrics_row,
)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive updates were non-finite for the run to be worth continuing."""


@dataclass(frozen=True)
class UpdateBatch:
    """What every micro-batch of an update reads, on the device: advantages [N], the frozen log-probs the loss
    reads (``Objective.loss_inputs``) and the token weights."""

    advantages: torch.Tensor
    frozen: FrozenPass
    weights: TokenWeights


def keep_gradients(model: Any) -> None:
    """Under CUDA graphs a graph's outputs (gradients too) are overwritten at its next replay: accumulate into
    tensors of our own, allocated before every update (the cold-start SFT, for one, leaves them None)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        self.config, tr = config, config.train
        self.objective = Objective.from_config(config)
        self.accelerator = make_accelerator(config)
        self.is_main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if tr.async_rollouts and self.world > 1:  # known only now, and refused before any model loads
            raise ConfigError([
                f"train.async_rollouts: one process only, got {self.world} (the sampling thread's collectives would "
                "race the update's gradient all-reduce)"
            ])
        self.run_dir = prepare_run_dir(config, resume) if self.is_main else Path(config.run.output_dir)
        self.accelerator.wait_for_everyone()
        set_seed(tr.seed)
        data = load_training_data(config)
        self.rewards, self.train_data, self.eval_data = data.rewards, data.train, data.eval
        models = load_training_models(config, self.accelerator, self.objective.needs_reference)
        self.tokenizer, self.model, self.optimizer = models.tokenizer, models.model, models.optimizer
        self.scheduler, self.head_math, self.reference = models.scheduler, models.head_math, models.reference
        self.engine = policy_engine(config, self.accelerator.unwrap_model(self.model), self.tokenizer)
        self.sampling = SamplingParams(
            config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p, config.rollout.top_k
        )
        self.stream = PromptStream(len(self.train_data), tr.seed)
        self.episodes = Episodes.from_config(config.rollout)
        self.sampler = GroupSampler(
            config, self.rank, self.stream, self.train_data, self.engine, self.tokenizer, self.sampling, self.rewards,
            self.episodes,
        )
        self.prefetch = BatchPrefetcher(self.sampler, self.engine, self.accelerator.device) if tr.async_rollouts else None
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
            self.close()
        return self.summary()

    def _train(self) -> None:
        cfg = self.config
        if self.resumed_from is None:
            if cfg.run.eval_before:
                self.evaluate("base")
            if cfg.sft.data and cfg.sft.steps > 0:
                self.run_sft()
                interrupt.raise_if_requested()
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
            interrupt.raise_if_requested()
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

    def close(self) -> None:
        """Wait for a batch still being sampled (dropping it) and close the logs."""
        if self.prefetch is not None:
            self.prefetch.close()
        self.runlog.close()

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
        """One step: sample and score, shape rewards, advantages, the update, then the step's log lines."""
        G = self.config.rollout.group_size
        P = self.config.rollout.prompts_per_step // self.world  # this process's groups
        t0 = time.perf_counter()
        batch = self._sample_groups(P, G)
        stale = batch.stale  # sampled by the weights before the last update
        score_time = 0.0 if stale else batch.score_time  # prefetched: the wait is the generation, scoring ran beside
        t_score = time.perf_counter()
        t_generate = t_score - score_time
        rewards = torch.tensor(batch.scores.total, dtype=torch.float32).view(P, G)

        rollout = batch.rollout
        inputs = functools.cache(partial(self._model_inputs, rollout))  # laid out once, by the first pass that needs them
        frozen = self._frozen_pass(rollout, inputs, stale)
        shaped, shaping = self.objective.shape_rewards(rewards, rollout.loss_mask, frozen)
        advantages = self.objective.advantages(shaped)
        stats = {**batch.stats, **shaping, **self.optimize(rollout, advantages, frozen, inputs, stale=stale)}
        t_end = time.perf_counter()
        self.step += 1

        record = StepRecord(
            samples=[row for row in batch.rows for _ in range(G)], texts=rollout.texts, scores=batch.scores,
            advantages=advantages.tolist(), lengths=rollout.loss_mask.sum(dim=1).float().tolist(),
            truncated=rollout.truncated.tolist(), stats=stats, tokens=rollout.num_completion_tokens, turns=rollout.turns,
            observation_tokens=None if rollout.observation_mask is None else rollout.observation_mask.sum(dim=1).tolist(),
        )
        if self.world > 1:  # log the whole step once: every process's groups, in process order
            record = gather_step(record, gather_object)
        times = StepTimes(t_generate - t0, t_score - t_generate, t_end - t_score)
        reasoning = ReasoningInputs(self.config.run.reflection_phrases, token_counter(self.tokenizer))
        extra = {"lr": self.scheduler.get_last_lr()[0], "processes": self.world}
        metrics = metrics_row(record, self.step, G, times, reasoning, extra)
        self.runlog.metrics(metrics)
        self.runlog.completions(completion_rows(record, self.step))
        return metrics

    def _sample_groups(self, P: int, G: int) -> SampledBatch:
        """This step's batch; under ``train.async_rollouts`` the one sampled during the last step (the first step
        samples its own), and the next one is started before this step's update."""
        if self.prefetch is None:
            return self.sampler.sample(P, G)
        batch = self.prefetch.take() if self.prefetch.pending else self.sampler.sample(P, G)
        if self.step + 1 < self.config.train.steps:
            self.prefetch.start(P, G)
        return batch

    def _frozen_pass(self, rollout: Rollout, inputs: Callable[[], list[LogprobInputs]], stale: bool = False) -> FrozenPass:
        """What the objective needs from models that are not being updated, computed once per batch over all of it,
        and the log-probs the engine recorded while sampling (the objective logs its gap to them, and may correct it).
        ``inputs`` lays out the batch's model inputs (``_model_inputs``), asked only where a model runs. ``stale``:
        sampled by older weights than the model's, so the recorded log-probs are the only old policy's."""
        old = entropy = ref = None
        temperature = self.config.rollout.temperature
        recorded = self.config.train.rollout_logprobs or stale
        if recorded and rollout.logprobs is not None and not self.objective.needs_entropy:
            old = rollout.logprobs  # recorded while sampling: no forward pass
        elif self.objective.needs_old_logprobs:
            old, entropy = frozen_logprobs(self.model, rollout, inputs(), self.accelerator, temperature, self.head_math)
        if self.objective.needs_reference:
            with self._reference() as reference:
                ref, _ = frozen_logprobs(reference, rollout, inputs(), self.accelerator, temperature, self.head_math)
        return FrozenPass(old, entropy, ref, rollout.logprobs)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[Any]:
        """The reference model: its own copy, or under ``model.lora`` the policy with its adapters switched off
        (the base model, so no second copy is loaded)."""
        if self.reference is not None:
            yield self.reference
            return
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            yield self.model

    def optimize(
        self,
        rollout: Rollout,
        advantages: torch.Tensor,
        frozen: FrozenPass,
        inputs: Callable[[], list[LogprobInputs]],
        stale: bool = False,
    ) -> dict[str, Any]:
        """``num_iterations`` optimizer steps over the batch, each accumulating gradients over micro-batches.

        ``frozen`` is ``_frozen_pass(rollout, inputs, stale)``. The passes run over the rows with a gradient
        (``Objective.has_gradient``, ``update_rows``), whose model inputs (``inputs()`` when they are the whole batch)
        are on the device before the loop, so that it never waits on the host; the token weights are the whole
        batch's. Per-token stats are ``TokenMean``s over every iteration's tokens; the first iteration's forward
        passes are at the sampling weights (``Objective.loss``'s ``fresh``) unless the batch is ``stale``
        (``train.async_rollouts``).
        """
        objective, device, tr = self.objective, self.accelerator.device, self.config.train
        aggregate = partial(aggregate_over_processes, objective.aggregate, self.accelerator)
        weights = objective.weigh(rollout.loss_mask, rollout.truncated, frozen.entropy, aggregate)
        kept = torch.arange(len(advantages))
        if objective.leaves_out_zero_advantage:  # else every row runs: no count for the processes to agree on
            kept = update_rows(objective.has_gradient(advantages), tr.micro_batch_size, self.accelerator, tr.cuda_graphs)
        frozen_kept = objective.loss_inputs(frozen, stale).select(kept)
        step = UpdateBatch(advantages[kept].to(device), frozen_kept.to(device), weights.select(kept).to(device))
        if len(kept) == len(advantages):
            laid_out = inputs()
        elif len(kept):
            laid_out = self._model_inputs(concat_rollouts([(rollout, kept.tolist())], self.tokenizer.pad_token_id))
        else:
            laid_out = []
        slices = micro_batches(len(kept), tr.micro_batch_size)
        sums, losses, grad_norms = TokenSums(), [], []
        self.model.train()
        if tr.cuda_graphs or not slices:  # no pass at all: zero gradients, so that the optimizer steps as on any batch
            keep_gradients(self.model)
        for iteration in range(objective.num_iterations):
            with packed_products(self.model, enabled=not self.config.train.compile):
                pass_losses = [
                    self._micro_step(batch, rows, i == len(slices) - 1, step, sums, fresh=iteration == 0 and not stale)
                    for i, (rows, batch) in enumerate(zip(slices, laid_out, strict=True))
                ]
            losses += pass_losses
            grad_norms += self._update(pass_losses)
        out: dict[str, Any] = dict(sums.means())
        if grad_norms:
            out["grad_norm"] = float(np.mean(grad_norms))
        out["skipped_updates"] = float(objective.num_iterations - len(grad_norms))
        out["loss"] = float(torch.stack(losses).sum()) / objective.num_iterations if losses else 0.0
        out["update_fraction"] = TokenMean(float(len(kept)), float(len(advantages)))
        out |= objective.batch_metrics(weights, rollout.loss_mask, rollout.truncated)
        if objective.refreshes_reference(self.step + 1):  # self.step + 1: the step ending now
            self._refresh_reference()
        return out

    def _micro_step(
        self, batch: LogprobInputs, rows: slice, sync: bool, step: UpdateBatch, sums: TokenSums, fresh: bool
    ) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients synchronised across processes when ``sync``; ``fresh``
        when the weights are still those that sampled it); its per-token stats are added to ``sums``, on the device.
        Returns its detached loss."""
        width = batch.completion_width
        if self.config.train.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # nothing of the last micro-batch's replay is needed
        mine = step.weights.select(rows, width)
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
            logprobs, entropy = logprobs_from_inputs(
                self.model, batch, temperature=self.config.rollout.temperature,
                entropy_grad=self.objective.entropy_grad, head_math=self.head_math,
            )
            mask = batch.trained_mask.to(logprobs.dtype)
            frozen = step.frozen.select(rows, width)
            per_token, stats = self.objective.loss(
                logprobs, step.advantages[rows], mask, frozen, entropy, mine.policy, fresh=fresh
            )
            loss = (per_token * mine.weights).sum()
            self.accelerator.backward(loss)
        for name, values, where in self.objective.token_metrics(stats, entropy, mask, mine.trained.float()):
            sums.add(name, values, where)
        return loss.detach()

    def _update(self, losses: list[torch.Tensor]) -> list[float]:
        """The optimizer step on the accumulated gradients, unless the loss or the gradient norm is not finite
        (such an update would poison the weights for good: it is dropped and said so). Returns the norm, if applied."""
        max_norm = self.config.train.max_grad_norm or float("inf")  # clipping off: the norm is still computed
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        applied = math.isfinite(grad_norm) and (not losses or bool(torch.isfinite(torch.stack(losses)).all()))
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        else:
            log.warning("step %d: non-finite loss or gradient norm (%s), update skipped", self.step + 1, grad_norm)
        self.optimizer.zero_grad(set_to_none=not self.config.train.cuda_graphs)
        return [grad_norm] if applied else []

    @torch.no_grad()
    def _refresh_reference(self) -> None:
        """Reset the reference to the current policy (``train.ref_update_every``)."""
        self.reference.load_state_dict(full_weights(self.accelerator, self.model, main_only=False))

    def _model_inputs(self, rollout: Rollout) -> list[LogprobInputs]:
        return model_inputs(rollout, self.config, self.tokenizer.pad_token_id, self.accelerator.device)

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, stage: str) -> dict[str, Any]:
        """Greedy accuracy on the held-out split; logged to evals.jsonl with its samples."""
        if self.prefetch is not None:  # the engine samples one batch at a time
            self.prefetch.wait()
        result = evaluate_config(
            self.config, self.engine, self.tokenizer, self.eval_data, self.rewards, self.is_main, self.episodes
        )
        self.runlog.evaluation({"step": self.step, "stage": stage, **result})
        if self.is_main:
            tqdm.write(f"[eval {stage} @ step {self.step}] {describe(result)}")
        return result

    def summary(self) -> dict[str, Any]:
        """Held-out accuracy at each evaluated stage, written to summary.json."""
        return write_summary(self.run_dir, self.step, self.is_main)

    # ---------------------------------------------------------------- checkpoints

    def _checkpointed(self) -> Checkpointed:
        return Checkpointed(
            self.accelerator, self.model, self.tokenizer, self.optimizer, self.scheduler, self.reference,
            reference_moves=bool(self.objective.ref_update_every),
        )

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N`` of this step (``rlreason.training.checkpoint.save_checkpoint``)."""
        position = self.stream.position
        if self.prefetch is not None and self.prefetch.position is not None:  # a resumed run draws that batch again
            position = self.prefetch.position
        return save_checkpoint(self.run_dir, self.step, position, self._checkpointed(), self.config.run.keep_last)

    def _resume(self) -> Path | None:
        """Restore the run from its latest complete checkpoint; with no checkpoint, start over with empty logs."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            if self.is_main:
                restart_logs(self.run_dir)
            self._say(f"--resume: no checkpoint in {self.run_dir} yet, so the run starts over (its logs are restarted)")
            return None
        self.step, self.stream.position = load_checkpoint(checkpoint, self.run_dir, self._checkpointed())
        self._say(f"resuming from {checkpoint} (step {self.step} of {self.config.train.steps})")
        return checkpoint
