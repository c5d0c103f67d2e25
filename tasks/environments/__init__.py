"""Multi-turn environments: what answers the policy between its turns.

An environment is two methods. ``reset(row)`` gives the chat messages an episode starts from; ``step(state, text)``
reads the policy's latest turn and answers with an observation (or None) and whether the episode is over. The
rollout engines append the observation's tokens to the episode and let the policy go on; they never re-tokenise
what the policy wrote. Scores still come from the reward functions, which find the episode's turns in
``sample["turns"]``.

An observation is either text, appended inside the policy's own message as it is (a tool's output, ToRL-style),
or a chat message (``{"role": "user", "content": ...}``), which closes the policy's message and opens the next
one through the chat template. A message with ``"inline": True`` is appended as text too (text is shorthand for
``{"role": "tool", "content": text, "inline": True}``), and ``"error": True`` marks a tool call that failed
(counted in the run's metrics). A turn ends at the end of a message or at one of the environment's ``stop``
strings (a closed tool-call block).

A minimal environment::

    @environment("echo")
    class Echo:
        stop = ()

        def reset(self, row):
            return row["prompt"]

        def step(self, state, text):
            if state["turn"] >= 2:
                return None, True
            return {"role": "user", "content": f"You said {len(text)} characters. Again?"}, False

``state`` is a dict per episode: ``row`` (the dataset row), ``turn`` (turns taken so far, counting this one) and
``turns`` (the episode so far, role-tagged); an environment may keep its own keys in it. An environment with a
``step_batch(states, texts)`` method is given a whole turn's rows at once (the Python tool runs them in parallel).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from rewards.registry import import_from_cwd, import_modules

Observation = str | dict[str, Any]
"""Text appended inside the policy's message, or a chat message that ends it (see the module docstring)."""

Message = dict[str, str]


@runtime_checkable
class Environment(Protocol):
    stop: tuple[str, ...]
    """Strings that end a turn besides the end of a message (e.g. the fence that closes a code block)."""

    def reset(self, row: dict[str, Any]) -> list[Message]: ...

    def step(self, state: dict[str, Any], text: str) -> tuple[Observation | None, bool]: ...


EnvironmentFactory = Callable[..., Environment]

_ENVIRONMENTS: dict[str, EnvironmentFactory] = {}
_builtins_loaded = False


def environment(name: str) -> Callable[[EnvironmentFactory], EnvironmentFactory]:
    """Register an environment class (or factory ``fn(**options) -> Environment``) under ``name``."""

    def register(factory: EnvironmentFactory) -> EnvironmentFactory:
        _ENVIRONMENTS[name] = factory
        return factory

    return register


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        import_modules("tasks.environments")
        _builtins_loaded = True


def environment_names() -> list[str]:
    _load_builtins()
    return sorted(_ENVIRONMENTS)


def get_environment(name: str, **options: Any) -> Environment:
    """The environment registered as ``name`` (or ``module:factory``), built with ``options``."""
    _load_builtins()
    if ":" in name:
        module, _, attr = name.partition(":")
        factory = getattr(import_from_cwd(module), attr)
    elif name in _ENVIRONMENTS:
        factory = _ENVIRONMENTS[name]
    else:
        close = difflib.get_close_matches(name, list(_ENVIRONMENTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown environment {name!r}{hint} (known: {', '.join(sorted(_ENVIRONMENTS))})")
    env = factory(**options)
    if not isinstance(env, Environment):
        raise TypeError(f"environment {name!r} has no reset(row) / step(state, text) / stop")
    return env


def step_all(env: Environment, states: list[dict[str, Any]], texts: list[str]) -> list[tuple[Observation | None, bool]]:
    """One turn's answers for many episodes: ``env.step_batch`` when it has one, else ``step`` row by row."""
    batch = getattr(env, "step_batch", None)
    if batch is not None:
        return list(batch(states, texts))
    return [env.step(state, text) for state, text in zip(states, texts, strict=True)]
