"""A ``verifiers`` environment (SingleTurnEnv, MultiTurnEnv or a subclass) as an environment of episodes.

The engines write the policy's turns; between them this adapter walks the environment's own rollout loop
(``MultiTurnEnv.rollout``, whose model call is the one step it leaves out): the turn becomes the model response
(``add_model_response``), the stop conditions run (``is_completed``: ``max_turns``, the env's own ``@vf.stop``
methods, errors), and otherwise ``get_prompt_messages`` calls ``env_response``, whose messages are the observation.
A ``final_env_response`` ends the episode as it ends a verifiers rollout. A SingleTurnEnv ends after its first
turn by its own ``max_turns`` of 1. The env's ``sampling_args["stop"]`` strings end a turn, and are left out of
the text the env reads, as its server would leave them out.

Rows come from the task ``verifiers``: they name their environment (``vf_env``), so the options may be left
out; given, they must name the same one. The episode state keeps the vf State under ``"vf"`` (a
``rewards.vf_envs.Episode``: the State and the messages the next turn answers).

Several messages of one ``env_response`` reach the policy as one message (their texts joined); the vf State keeps
them apart, and the rubric scores that. A prompt that ``setup_state`` rewrites is not what the policy sees: the
runner renders each row's prompt once for all its episodes.
"""

from __future__ import annotations

from typing import Any

from rewards.vf_envs import (
    RECORDS,
    ROW_FIELDS,
    Episode,
    add_turn,
    environment_for,
    load_environment,
    new_episode,
    run_all,
    stop_strings,
)
from tasks.environments import Message, Observation, environment


def message_text(message: Any) -> str:
    """A vf message's text: its string content, or its text parts joined (other parts have no text form here)."""
    content = message["content"]
    if isinstance(content, str) or content is None:
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(f"a {part.get('type')!r} content part has no text form; only text messages are supported")
        texts.append(part["text"])
    return " ".join(texts)


def observation(messages: list[Any]) -> Observation:
    """``env_response``'s messages as the one chat message the runner appends."""
    role = "tool" if messages and all(m["role"] == "tool" for m in messages) else "user"
    return {"role": role, "content": "\n\n".join(message_text(m) for m in messages)}


async def answer(env: Any, episode: Episode, text: str) -> list[Any] | None:
    """The environment's reply to the policy's ``text`` (its new messages), or None when the episode is over."""
    import verifiers as vf
    from verifiers.legacy.utils.message_utils import maybe_normalize_messages

    state = episode.state
    await add_turn(env, episode, text)
    if await env.is_completed(state):
        return None
    last = state["trajectory"][-1]
    history = [*last["prompt"], *last["completion"]]
    try:
        prompt = await env.get_prompt_messages(state)
    except vf.Error as exc:  # verifiers' rollout keeps it, and its has_error stop ends the episode
        state["error"] = exc
        await env.is_completed(state)
        return None
    prompt = maybe_normalize_messages(prompt, field_name="prompt_messages")
    if state.get("final_env_response") is not None:
        await env.is_completed(state)
        return None
    if prompt[: len(history)] != history:
        raise ValueError(
            f"{type(env).__name__}.get_prompt_messages rewrote the conversation so far; only environments whose "
            "next prompt extends the last one are supported (the policy's tokens are never re-rendered)"
        )
    episode.prompt = prompt
    return prompt[len(history) :]


@environment("verifiers")
class VerifiersEnv:
    """Episodes in the environment that ``load`` builds (with ``args``), or in the one each row names."""

    def __init__(self, **options: Any):
        self.key = environment_for(options, "rollout.env_options")[0] if options else None
        self._keys = dict.fromkeys([self.key] if self.key else [])

    @property
    def stop(self) -> tuple[str, ...]:
        """The stop strings of the environments run so far (their ``sampling_args["stop"]``)."""
        return tuple(dict.fromkeys(s for key in self._keys for s in stop_strings(load_environment(key))))

    def reset(self, row: dict[str, Any]) -> list[Message]:
        missing = [f for f in ROW_FIELDS if f not in row]
        if missing:
            raise ValueError(f"environment 'verifiers': rows lack {missing}; they come from the task 'verifiers'")
        if self.key is not None and row["vf_env"] != self.key:
            raise ValueError(
                f"rollout.env_options name the environment {self.key}, but the task's rows come from {row['vf_env']}"
            )
        self._keys[row["vf_env"]] = None
        return row["prompt"]

    def step(self, state: dict[str, Any], text: str) -> tuple[Observation | None, bool]:
        return self.step_batch([state], [text])[0]

    def step_batch(self, states: list[dict[str, Any]], texts: list[str]) -> list[tuple[Observation | None, bool]]:
        """One turn of many episodes, their ``env_response`` calls run concurrently."""
        envs = [load_environment(state["row"]["vf_env"]) for state in states]
        fresh = [i for i, state in enumerate(states) if "vf" not in state]
        made = run_all(new_episode(envs[i], states[i]["row"]) for i in fresh)
        for i, episode in zip(fresh, made, strict=True):
            states[i]["vf"] = episode
            RECORDS.put(states[i]["turns"], episode)
        replies = run_all(answer(env, s["vf"], t) for env, s, t in zip(envs, states, texts, strict=True))
        return [(None, True) if reply is None else (observation(reply), False) for reply in replies]
