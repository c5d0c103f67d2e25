"""Sampling a step's groups: P prompts from the shared stream, G scored completions each, with DAPO's dynamic
sampling; and the per-micro-batch model inputs and frozen passes over the sampled batch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rlreason.config import Config
from rlreason.data import PromptStream
from rlreason.objective.advantages import zero_variance_groups
from rlreason.rollout.engine import Rollout, SamplingParams, concat_rollouts
from rlreason.rollout.episodes import Episodes, complete, scored_samples
from rlreason.rollout.sampling import completion_seed
from rlreason.scoring import Scores, concat_scores, score
from rlreason.training.logprobs import LogprobInputs, logprob_inputs, logprobs_from_inputs


@dataclass(frozen=True)
class SampledBatch:
    """This process's P prompts (``rows``) with G scored completions each, in group order, and how sampling went:
    ``stats`` (DAPO's rounds, dropped and refilled groups) and the seconds spent scoring; ``stale`` when it was
    sampled during the step before, by the weights before that step's update (``train.async_rollouts``)."""

    rows: list[dict[str, Any]]
    rollout: Rollout
    scores: Scores
    stats: dict[str, float]
    score_time: float
    stale: bool = False


@dataclass(frozen=True)
class GroupSampler:
    """Draws prompts from ``stream`` (shared by every process), samples them with ``engine`` and scores them."""

    config: Config
    rank: int
    stream: PromptStream
    data: Any
    engine: Any
    tokenizer: Any
    sampling: SamplingParams
    rewards: Any
    episodes: Episodes | None = None

    def sample(self, P: int, G: int) -> SampledBatch:
        """P prompts, G scored completions each, and the sampling stats.

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
            rows = [self.data[drawn[i]] for i in mine]
            seeds = [completion_seed(tr.seed, first_draw + i, g) for i in mine for g in range(G)]
            rollout = complete(
                self.engine, self.tokenizer, rows, G, self.sampling, seeds, self.episodes, self.config.rollout.prefill
            )
            start = time.perf_counter()
            scores = score(rollout.texts, scored_samples(rows, G, rollout), self.rewards, self.config.run.reward_timeout)
            score_time += time.perf_counter() - start
            if not tr.dynamic_sampling:
                return SampledBatch(rows, rollout, scores, {}, score_time)
            flat = zero_variance_groups(torch.tensor(scores.total).view(len(rows), G))
            for g, row in enumerate(rows):
                (dropped if flat[g] else kept).append((row, rollout, scores, range(g * G, g * G + G)))
        refill = dropped[: P - len(kept)]
        groups = kept + refill
        calls = list({id(s): s for *_, s, _ in kept + dropped}.values())
        scores = concat_scores([(s, list(r)) for *_, s, r in groups], calls)
        rollout = concat_rollouts([(r, list(idx)) for _, r, _, idx in groups], self.tokenizer.pad_token_id)
        stats = {
            "dynamic_sampling/rounds": rounds,
            "dynamic_sampling/dropped_groups": len(dropped),
            "dynamic_sampling/refilled_groups": len(refill),
        }
        return SampledBatch([row for row, *_ in groups], rollout, scores, stats, score_time)


def aggregate_over_processes(
    aggregate: Callable[[torch.Tensor], torch.Tensor], accelerator: Accelerator, loss_mask: torch.Tensor
) -> torch.Tensor:
    """``aggregate`` (token weights) over the batch of all processes, this process's rows of it.

    The aggregation's divisors (sequences, tokens) count the whole batch, and the weights are multiplied by
    the number of processes because data-parallel training averages their gradients.
    """
    world = accelerator.num_processes
    if world == 1:
        return aggregate(loss_mask)
    padded = accelerator.pad_across_processes(loss_mask.to(accelerator.device), dim=1)
    everyone = aggregate(accelerator.gather(padded).cpu())
    rows = slice(accelerator.process_index * len(loss_mask), (accelerator.process_index + 1) * len(loss_mask))
    return everyone[rows, : loss_mask.shape[1]] * world


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(s, s + size) for s in range(0, n, size)]


def update_rows(
    has_gradient: torch.Tensor, micro_batch_size: int, accelerator: Accelerator, whole_micro_batches: bool = False
) -> torch.Tensor:
    """The rows an update runs forward and backward, in batch order (a group's completions stay together): those
    with a gradient, topped up with rows without one where shapes or collectives need them. Every process runs as
    many micro-batches as the busiest (DDP and FSDP run collectives in each pass, so the counts must match);
    ``whole_micro_batches`` keeps every micro-batch but the batch's last at full size (one CUDA graph per shape)."""
    n, kept = len(has_gradient), int(has_gradient.sum())
    target = min(math.ceil(kept / micro_batch_size) * micro_batch_size, n) if whole_micro_batches else kept
    if accelerator.num_processes > 1:
        busiest = max(gather_object([math.ceil(kept / micro_batch_size)]))
        target = max(target, min((busiest - 1) * micro_batch_size + 1, n)) if busiest else target
    filler = (~has_gradient).nonzero().flatten()[: target - kept]
    return torch.cat([has_gradient.nonzero().flatten(), filler]).sort().values


def model_inputs(rollout: Rollout, config: Config, pad_id: int, device: torch.device) -> list[LogprobInputs]:
    """Each micro-batch's model inputs, laid out on the CPU (columns that are padding in every row cut away)
    and sent to the device without waiting for it: once a step, for the frozen passes and the updates."""
    tr, out = config.train, []
    for rows in micro_batches(len(rollout.texts), tr.micro_batch_size):
        prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
        loss_mask = rollout.loss_mask[rows]
        first = int((prompt_mask.sum(dim=0) > 0).nonzero()[0])
        width = max(int(completion_mask.sum(dim=1).max()), 1)
        inputs = logprob_inputs(
            rollout.prompt_ids[rows, first:], prompt_mask[:, first:], rollout.completion_ids[rows, :width],
            completion_mask[:, :width], packing=tr.packing, shared_prompt=tr.shared_prompt,
            # train.cuda_graphs: one graph per 64-token bucket of row widths, padding columns after the completions
            width_multiple=64 if tr.cuda_graphs else 1, pad_id=pad_id, loss_mask=loss_mask[:, :width],
        )
        out.append(inputs.to(device))
    return out


@torch.no_grad()
def frozen_logprobs(
    model: Any, rollout: Rollout, inputs: list[LogprobInputs], accelerator: Accelerator, temperature: float, head_math: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of the batch (on the CPU) under a model that is not being updated now (old policy or
    reference); ``inputs`` are ``model_inputs(rollout, ...)``."""
    device = accelerator.device
    out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=device)
    entropy = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32, device=device)
    start = 0
    for batch in inputs:
        mb, start = slice(start, start + len(batch.completion_mask)), start + len(batch.completion_mask)
        with accelerator.autocast():  # the reference is not prepared: give it the policy's precision
            logprobs, ent = logprobs_from_inputs(model, batch, temperature=temperature, head_math=head_math)
        out[mb, : logprobs.shape[1]] = logprobs.float()
        entropy[mb, : ent.shape[1]] = ent.float()
    return out.cpu(), entropy.cpu()
