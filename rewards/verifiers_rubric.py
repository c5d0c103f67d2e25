"""``verifiers_rubric``: each episode scored by its ``verifiers`` environment's own rubric.

The score is the rubric's total: every reward function times its weight, over the environment's rubric and those
it added (MultiTurnEnv's ``num_turns`` is one, of weight 0). Functions may be sync or async and take any of
verifiers' named arguments (``completion``, ``answer``, ``state``, ``info``, ``parser``, ...); one that raises
scores 0, as in verifiers. Each function's own score is a reward too, named
``rewards.verifiers_rubric:metric_<function>`` (given weight 0 in a config, it is logged and not trained on).

The functions read the vf State the environment adapter ran the episode in (``rewards.vf_envs``): the policy's
turns are its trajectory, ``completion`` is rendered by the environment's cleanup (``render_completion``), and
state keys set by ``setup_state`` or ``env_response`` are there. A turn the runner ended the episode on without
asking the environment (its turn limit, the token budget) is added first, as verifiers adds the last model
response. An episode not run in this process (turns read back from a file) gets a fresh state replaying its
transcript, without calling ``env_response`` again; a sample without turns (a run with no ``rollout.env``) is one
turn. The episodes of one prompt are scored together (``score_group``), so group reward functions work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rewards.registry import RewardFn, reward
from rewards.vf_envs import (
    RECORDS,
    ROW_FIELDS,
    Episode,
    add_turn,
    load_environment,
    new_episode,
    run,
)

Result = tuple[float, dict[str, float]]
METRIC_PREFIX = "metric_"


@reward("verifiers_rubric", fields=ROW_FIELDS)
def verifiers_rubric(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
    """The rubric's weighted total per episode; None for rows of other tasks."""
    return [None if result is None else result[0] for result in rubric_results(completions, samples)]


def metric_reward(name: str) -> RewardFn:
    """The reward that is the rubric function ``name``'s own score (unweighted)."""

    def metric(completions: list[str], samples: list[dict[str, Any]]) -> list[float | None]:
        scores: list[float | None] = []
        for result in rubric_results(completions, samples):
            if result is not None and name not in result[1]:
                raise KeyError(f"the rubric has no function {name!r} (it has: {', '.join(sorted(result[1]))})")
            scores.append(None if result is None else result[1][name])
        return scores

    metric.__name__ = f"{METRIC_PREFIX}{name}"
    return metric


def __getattr__(attr: str) -> RewardFn:
    """``metric_<function>`` for any function: the names depend on the environment, known only once it loads."""
    if attr.startswith(METRIC_PREFIX):
        return metric_reward(attr.removeprefix(METRIC_PREFIX))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def rubric_results(completions: list[str], samples: list[dict[str, Any]]) -> list[Result | None]:
    """(total, per-function scores) of each sample of a verifiers task, scored once and then remembered."""
    results: list[Result | None] = [None] * len(samples)
    by_env: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        if all(field in sample for field in ROW_FIELDS):
            by_env.setdefault(sample["vf_env"], []).append(i)
    for key, indices in by_env.items():
        env = load_environment(key)
        episodes = []
        for i in indices:
            anchor = samples[i].get("turns", samples[i])
            episode = RECORDS.get(anchor)
            if episode is None:
                episode = run(new_episode(env, samples[i]))
                RECORDS.put(anchor, episode)
            episodes.append(episode)
        turns = [samples[i].get("turns") or [{"role": "assistant", "content": completions[i]}] for i in indices]
        problems = [(samples[i]["vf_split"], samples[i]["vf_index"]) for i in indices]
        run(_score(env, [p for p in zip(episodes, turns, problems, strict=True) if p[0].result is None]))
        for i, episode in zip(indices, episodes, strict=True):
            results[i] = episode.result
    return results


async def _score(env: Any, pending: list[tuple[Episode, list[dict[str, Any]], tuple]]) -> None:
    """Finish each episode's state and score the episodes of each prompt as one group, as verifiers does."""
    await asyncio.gather(*(_finish(env, episode, turns) for episode, turns, _ in pending))
    groups: dict[tuple, list[Episode]] = {}
    for episode, _, problem in pending:
        groups.setdefault(problem, []).append(episode)
    for group in groups.values():
        states = [episode.state for episode in group]
        await env.rubric.score_group(states)
        for episode in group:
            episode.result = (float(episode.state["reward"]), dict(episode.state["metrics"] or {}))
        for state in states:
            await env.rubric.cleanup(state)


async def _finish(env: Any, episode: Episode, turns: list[dict[str, Any]]) -> None:
    """Add the policy's turns the state lacks (their observations from the transcript), then the env's cleanup,
    which renders the completion."""
    from verifiers.legacy.types import ToolMessage, UserMessage

    steps: list[tuple[str, list[dict[str, Any]]]] = []
    for turn in turns:
        if turn["role"] == "assistant":
            steps.append((turn["content"], []))
        elif steps:
            steps[-1][1].append(turn)
    state = episode.state
    recorded = len(state["trajectory"])
    for i in range(recorded, len(steps)):
        if i > recorded:
            last = state["trajectory"][-1]
            observed = [
                ToolMessage(content=t["content"], tool_call_id="") if t["role"] == "tool" else UserMessage(content=t["content"])
                for t in steps[i - 1][1]
            ]
            episode.prompt = [*last["prompt"], *last["completion"], *observed]
        await add_turn(env, episode, steps[i][0])
    if len(steps) > recorded:
        await env.is_completed(state)
    await env.cleanup(state)
