"""Episodes: completions of several turns, an environment answering between them (tasks.environments).

The runner is the same for every engine, so the reference and the fast engine give the same episodes: each turn,
every live episode's context (its prompt, then every token of the episode so far, exactly as generated or
appended) is handed to ``engine.generate`` with a seed of its own, the turn is cut at the end of a message or
at the environment's first stop string, and the environment's observation is tokenised once and appended. Token
ids are never re-derived from text, so a chat template cannot shift a turn.

The episode is a ``Rollout`` whose completion holds the policy's tokens and the observations' tokens in order;
``observation_mask`` marks the latter, and the trainer's ``loss_mask`` leaves them out of the loss and of every
per-token statistic. The G episodes of a prompt stay one group.

Left out: a row that ends its turn waits for the turn's other rows, and each later turn prefills its context afresh
(the fast engine's prompt-sharing applies to the first turn only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch

from rlreason.data import encode_prompts
from rlreason.rollout.engine import Rollout, RolloutEngine, SamplingParams, draw_seeds, left_pad
from tasks.environments import Environment, Observation, get_environment, step_all
from tasks.prompts import render

_MASK_63 = (1 << 63) - 1


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    """Turns of the policy per episode."""
    max_tokens: int
    """Tokens of an episode after its prompt: the policy's and the observations' together."""


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of a completion's ``turn``-th turn; turn 0 keeps the completion's own seed, so a
    one-turn episode samples exactly what a plain completion would."""
    if turn == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:turn:{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK_63


def stop_cut(ids: list[int], tokenizer: Any, stops: tuple[str, ...]) -> int | None:
    """Tokens in the shortest prefix of ``ids`` whose text holds one of ``stops`` (None when none appears)."""
    if not stops or not ids:
        return None

    def stopped(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not stopped(len(ids)):
        return None
    low, high = 1, len(ids)  # the shortest stopped prefix lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if stopped(mid):
            high = mid
        else:
            low = mid + 1
    return low


def observation_ids(tokenizer: Any, observation: Observation, after_eos: int | None) -> list[int]:
    """Tokens of an observation. Text is appended as it is; a chat message goes through the chat template: the
    text that follows an assistant message up to the next assistant message's start (closing the policy's message
    unless its end-of-message token ``after_eos`` was generated already)."""
    if isinstance(observation, str) or observation.get("inline"):
        text = observation if isinstance(observation, str) else observation["content"]
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    marker = "\x00rlreason\x00"
    head = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
    full = render(tokenizer, [*head, {"role": observation.get("role", "user"), "content": observation["content"]}])
    suffix = full[full.index(marker) + len(marker) :]
    if after_eos is not None:
        eos_text = tokenizer.decode([after_eos])
        if suffix.startswith(eos_text):
            suffix = suffix[len(eos_text) :]
    return tokenizer(suffix, add_special_tokens=False)["input_ids"]


@dataclass
class _Episode:
    prompt: list[int]
    state: dict[str, Any]
    ids: list[int]
    observed: list[int]
    logprobs: list[float]
    pieces: list[str]
    done: bool = False
    truncated: bool = False


def run_episodes(
    engine: RolloutEngine,
    tokenizer: Any,
    env: Environment,
    rows: list[dict[str, Any]],
    n: int,
    sampling: SamplingParams,
    limits: EpisodeLimits,
    seeds: list[int] | None = None,
) -> Rollout:
    """``n`` episodes of each row, grouped as ``engine.generate`` groups completions (see the module docstring)."""
    seeds = seeds or draw_seeds(len(rows) * n)
    eos = set(engine.eos_ids)
    episodes = []
    for row in rows:
        prompt = tokenizer(render(tokenizer, env.reset(row)), add_special_tokens=False)["input_ids"]
        episodes += [_Episode(prompt, {"row": row, "turn": 0, "turns": []}, [], [], [], []) for _ in range(n)]
    recorded = True
    for turn in range(limits.max_turns):
        live = [i for i, e in enumerate(episodes) if not e.done]
        if not live:
            break
        room = {i: limits.max_tokens - len(episodes[i].ids) for i in live}
        turn_sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, max(room.values())), stop=env.stop)
        turn_seeds = [turn_seed(seeds[i], turn) for i in live]
        if turn == 0:  # a group's episodes start from one context: the engine prefills it once for all n
            out = engine.generate([e.prompt for e in episodes[::n]], n, turn_sampling, turn_seeds)
        else:
            out = engine.generate([episodes[i].prompt + episodes[i].ids for i in live], 1, turn_sampling, turn_seeds)
        recorded = recorded and out.logprobs is not None
        asking = []
        for j, i in enumerate(live):
            e = episodes[i]
            ids = out.completion_ids[j, : int(out.completion_mask[j].sum())].tolist()
            cut = stop_cut(ids, tokenizer, env.stop)
            if cut is not None:
                ids = ids[:cut]
            ended = cut is not None or bool(ids and ids[-1] in eos)
            if len(ids) > room[i]:  # over the episode's budget: cut there, mid-turn
                ids, ended = ids[: room[i]], False
            text = tokenizer.decode(ids, skip_special_tokens=True)
            e.ids += ids
            e.observed += [0] * len(ids)
            e.logprobs += out.logprobs[j, : len(ids)].tolist() if out.logprobs is not None else [0.0] * len(ids)
            e.pieces.append(text)
            e.state["turn"] = turn + 1
            e.state["turns"].append({"role": "assistant", "content": text})
            if not ended:
                e.done = e.truncated = True
            elif turn == limits.max_turns - 1:
                e.done = True
            else:
                asking.append(i)
        answers = step_all(env, [episodes[i].state for i in asking], [episodes[i].pieces[-1] for i in asking])
        for i, (observation, finished) in zip(asking, answers, strict=True):
            _observe(episodes[i], observation, finished, tokenizer, eos, limits.max_tokens)
    return _as_rollout(episodes, tokenizer, recorded)


def _observe(e: _Episode, observation: Observation | None, finished: bool, tokenizer: Any, eos: set[int], budget: int) -> None:
    """Append an environment's answer to an episode, or end it (an answer that would fill the budget ends it too:
    the policy must have room for a turn after it)."""
    if finished or observation is None:
        e.done = True
        return
    ids = observation_ids(tokenizer, observation, e.ids[-1] if e.ids and e.ids[-1] in eos else None)
    if not ids and (isinstance(observation, str) or observation.get("inline")):
        return  # an empty inline observation only lets the policy go on (a stop string that was no turn boundary)
    if len(e.ids) + len(ids) >= budget:
        e.done = e.truncated = True
        return
    message = {"role": "tool", "content": observation, "inline": True} if isinstance(observation, str) else observation
    e.ids += ids
    e.observed += [1] * len(ids)
    e.logprobs += [0.0] * len(ids)
    e.pieces.append("" if message.get("inline") else "\n")
    turn = {"role": message.get("role", "user"), "content": message["content"], "tokens": len(ids)}
    e.state["turns"].append(turn | ({"error": True} if message.get("error") else {}))


def _as_rollout(episodes: list[_Episode], tokenizer: Any, recorded: bool) -> Rollout:
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([e.prompt for e in episodes], pad)
    width = max(1, max(len(e.ids) for e in episodes))

    def right(values: list[list], fill: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype)

    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=right([e.ids for e in episodes], pad, torch.long),
        completion_mask=right([[1] * len(e.ids) for e in episodes], 0, torch.long),
        texts=["".join(e.pieces) for e in episodes],
        truncated=torch.tensor([e.truncated for e in episodes]),
        logprobs=right([e.logprobs for e in episodes], 0.0, torch.float32) if recorded else None,
        observation_mask=right([e.observed for e in episodes], 0, torch.long),
        turns=[e.state["turns"] for e in episodes],
    )


@dataclass(frozen=True)
class Episodes:
    """The environment a run's completions are episodes in, and their limits (``rollout.env`` and its keys)."""

    env: Environment
    limits: EpisodeLimits

    @classmethod
    def from_config(cls, rollout: Any) -> Episodes | None:
        """From a config's ``rollout`` section; None when it names no environment."""
        if rollout.env is None:
            return None
        budget = rollout.max_episode_tokens or rollout.max_turns * rollout.max_new_tokens
        return cls(get_environment(rollout.env, **rollout.env_options), EpisodeLimits(rollout.max_turns, budget))


def complete(
    engine: RolloutEngine,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    n: int,
    sampling: SamplingParams,
    seeds: list[int] | None,
    episodes: Episodes | None,
    prefill: str = "",
) -> Rollout:
    """``n`` completions of each row: plain ones, or episodes in ``episodes.env``.

    A ``prefill`` (``rollout.prefill``) ends every prompt and starts every text, so rewards, logs and evaluation
    read the assistant's whole message although its first tokens were never sampled; episodes start without it.
    """
    if episodes is not None:
        return run_episodes(engine, tokenizer, episodes.env, rows, n, sampling, episodes.limits, seeds)
    rollout = engine.generate(encode_prompts(tokenizer, rows, prefill), n, sampling, seeds)
    return replace(rollout, texts=[prefill + text for text in rollout.texts]) if prefill else rollout


def scored_samples(rows: list[dict[str, Any]], n: int, rollout: Rollout) -> list[dict[str, Any]]:
    """The sample each completion's rewards read: its row, with the episode's ``turns`` when it is one."""
    samples = [row for row in rows for _ in range(n)]
    if rollout.turns is None:
        return samples
    return [{**row, "turns": turns} for row, turns in zip(samples, rollout.turns, strict=True)]
