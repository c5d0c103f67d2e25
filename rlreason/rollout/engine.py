"""Sampling G completions per prompt.

The trainer only sees ``RolloutEngine.generate(prompt_ids, n, sampling) -> Rollout``; the engine here wraps
transformers' ``generate`` and is the reference that faster engines must match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlreason.rollout.sampling import sample


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    min_new_tokens: int = 0
    """End-of-sequence tokens are not sampled before this many tokens (benchmarks force equal lengths with it)."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion like an end-of-sequence token (an episode's turn boundaries). Engines may
    sample a few tokens past one; ``rlreason.rollout.episodes.stop_cut`` cuts there."""


@dataclass
class Rollout:
    """``n`` completions of each prompt, grouped: rows ``i * n .. i * n + n - 1`` belong to prompt ``i``."""

    prompt_ids: torch.Tensor
    """[N, Lp] left-padded prompt tokens, one row per completion."""
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    """[N, Lc] completion tokens, right-padded."""
    completion_mask: torch.Tensor
    """[N, Lc] 1 on generated tokens up to and including the first end-of-sequence token."""
    texts: list[str]
    truncated: torch.Tensor
    """[N] bool: the completion hit max_new_tokens without ending."""
    logprobs: torch.Tensor | None = None
    """[N, Lc] float32 log-probability of each completion token under the sampling policy at the sampling
    temperature (before top-k/top-p), recorded while sampling; 0 where completion_mask is 0. None when the engine
    does not record them (HFEngine)."""
    observation_mask: torch.Tensor | None = None
    """[N, Lc] 1 on tokens an environment appended (episodes: rlreason.rollout.episodes); None for plain completions."""
    turns: list[list[dict[str, str]]] | None = None
    """Each episode's turns, role-tagged ("assistant", and "tool" or "user" for observations); None for plain completions."""

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, Lc] the tokens the policy generated: the completion mask less the observations."""
        if self.observation_mask is None:
            return self.completion_mask
        return self.completion_mask * (1 - self.observation_mask)

    @property
    def num_completion_tokens(self) -> int:
        """Tokens the policy generated (observations not counted)."""
        return int(self.loss_mask.sum())


class RolloutEngine(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int] | None = None
    ) -> Rollout:
        """``seeds``: one per completion (``rlreason.rollout.sampling.completion_seed``); None draws them from torch's RNG."""
        ...


def draw_seeds(count: int) -> list[int]:
    """Completion seeds from torch's global RNG, for callers that do not name their own."""
    return torch.randint(0, 2**62, (count,)).tolist()


class SeededSampler(LogitsProcessor):
    """Samples each row with its own seed (rlreason.rollout.sampling) and leaves ``generate`` only that token to pick."""

    def __init__(self, seeds: list[int], prompt_length: int, sampling: SamplingParams):
        self.seeds = torch.tensor(seeds, dtype=torch.long)
        self.prompt_length = prompt_length
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        position = input_ids.shape[1] - self.prompt_length
        tokens = sample(scores, self.seeds.to(scores.device), position, s.temperature, s.top_p, s.top_k)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into [B, L] ids and mask, padded on the left so every prompt ends at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS, and whether each row never produced one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, first_eos == length


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a turn: the tokenizer's EOS plus the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


class HFEngine:
    """transformers ``generate`` with an explicit generation config, so the model's defaults never leak in."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int] | None = None
    ) -> Rollout:
        ids, mask = left_pad([p for p in prompt_ids for _ in range(n)], self.tokenizer.pad_token_id)
        device = self.model.device
        # generate() itself only decodes greedily; the sampling, when there is any, is SeededSampler's pick
        gen_config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.eos_ids,
            min_new_tokens=sampling.min_new_tokens or None,
            stop_strings=list(sampling.stop) or None,
        )
        processors = LogitsProcessorList()
        if not sampling.greedy:
            processors.append(SeededSampler(seeds or draw_seeds(len(ids)), ids.shape[1], sampling))
        was_training = self.model.training
        self.model.eval()
        output = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config, logits_processor=processors,
            tokenizer=self.tokenizer if sampling.stop else None,
        )
        self.model.train(was_training)
        completion_ids = output[:, ids.shape[1] :].cpu()
        if completion_ids.shape[1] == 0:
            completion_ids = torch.full((len(output), 1), self.tokenizer.pad_token_id)
        cmask, truncated = completion_mask(completion_ids, self.eos_ids)
        texts = self.tokenizer.batch_decode(completion_ids * cmask + (1 - cmask) * self.tokenizer.pad_token_id, skip_special_tokens=True)
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            completion_ids=completion_ids,
            completion_mask=cmask,
            texts=texts,
            truncated=truncated,
        )


def concat_rollouts(parts: list[tuple[Rollout, list[int]]], pad_id: int) -> Rollout:
    """The chosen rows of several rollouts as one: prompts re-padded on the left, completions on the right.

    Dynamic sampling (DAPO) keeps some groups of each generation round; this joins them into one batch.
    """
    def pad(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype)
            padded.append(torch.cat([fill, t] if left else [t, fill], dim=1))
        return torch.cat(padded)

    picked = [(r, torch.tensor(rows, dtype=torch.long)) for r, rows in parts if rows]
    return Rollout(
        prompt_ids=pad([r.prompt_ids[i] for r, i in picked], pad_id, left=True),
        prompt_mask=pad([r.prompt_mask[i] for r, i in picked], 0, left=True),
        completion_ids=pad([r.completion_ids[i] for r, i in picked], pad_id, left=False),
        completion_mask=pad([r.completion_mask[i] for r, i in picked], 0, left=False),
        texts=[r.texts[j] for r, i in picked for j in i.tolist()],
        truncated=torch.cat([r.truncated[i] for r, i in picked]),
        logprobs=pad([r.logprobs[i] for r, i in picked], 0, left=False)
        if all(r.logprobs is not None for r, _ in picked)
        else None,
        observation_mask=pad([r.observation_mask[i] for r, i in picked], 0, left=False)
        if all(r.observation_mask is not None for r, _ in picked)
        else None,
        turns=[r.turns[j] for r, i in picked for j in i.tolist()] if all(r.turns is not None for r, _ in picked) else None,
    )
