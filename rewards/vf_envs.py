"""Environments written for the ``verifiers`` library: loaded once per process, and their episodes' states.

A run names such an environment by the user's ``load_environment`` and its keyword arguments (``load:
"module:function"``, ``args: {...}``). The task, the environment adapter and the rubric reward must all talk to
the same instance (the rubric scores the states the adapter built), so they share the cache here, keyed by
``environment_key``; every task row carries that key as ``vf_env``, which is how the reward finds it.

An episode's vf ``State`` is built by the environment's own hooks (``init_state``, ``setup_state``,
``add_model_response`` with the policy's text as the model response); the adapter records it under the
episode's list of turns (``RECORDS``), which the runner hands on to the reward in the episode's sample, so the
reward scores that very state: reward functions that read ``state`` see what ``setup_state`` and
``env_response`` put there.

verifiers is imported lazily, where it is used: a large import, and an optional dependency (the ``envs`` extra).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rewards.registry import import_from_cwd

OPTIONS = ("load", "args")
ROW_FIELDS = ("vf_env", "vf_split", "vf_index")
"""Where a task row came from: the environment's key, ``dataset`` or ``eval_dataset``, and the row's index there."""
POLICY = "policy"
"""The model name the states record; the policy is whatever model the run trains."""
_CAPACITY = 16384
"""Episodes whose states are kept for scoring; the oldest are forgotten first."""

_environments: dict[str, Any] = {}
_load_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def spec_problem(options: Mapping[str, Any], where: str) -> str | None:
    """What is wrong with ``{load, args}`` options (None when nothing is), as one line naming ``where`` they are set.

    Checked without calling the loader: the module is imported and the arguments are bound to its signature.
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        return f"{where}: unknown option(s) {unknown} (known: {', '.join(OPTIONS)})"
    load = options.get("load")
    if load is None:
        return f"{where}.load: missing; name the function that builds the environment, e.g. 'my_env:load_environment'"
    module_name, _, attr = load.partition(":") if isinstance(load, str) else ("", "", "")
    if not module_name or not attr:
        return f"{where}.load: expected 'module:function', got {load!r}"
    try:
        module = import_from_cwd(module_name)
    except ImportError as exc:
        hint = "; install rlreason's 'envs' extra" if exc.name == "verifiers" else ""
        return f"{where}.load: cannot import module {module_name!r} ({exc}){hint}"
    fn = getattr(module, attr, None)
    if not callable(fn):
        return f"{where}.load: module {module_name!r} has no function {attr!r}"
    args = options.get("args") or {}
    if not isinstance(args, Mapping):
        return f"{where}.args: expected a mapping of keyword arguments for {load}, got {args!r}"
    try:
        inspect.signature(fn).bind(**args)
    except TypeError as exc:
        return f"{where}.args: {load} does not take them ({exc})"
    return None


def environment_key(options: Mapping[str, Any]) -> str:
    """The canonical name of ``{load, args}``: equal options give equal keys whatever their order."""
    return json.dumps({"load": options["load"], "args": dict(options.get("args") or {})}, sort_keys=True)


def environment_for(options: Mapping[str, Any], where: str) -> tuple[str, Any]:
    """The key and the loaded environment of validated options (ValueError: one line saying what is wrong)."""
    problem = spec_problem(options, where)
    if problem is not None:
        raise ValueError(problem)
    key = environment_key(options)
    return key, load_environment(key)


def load_environment(key: str) -> Any:
    """The environment ``key`` names, built on first use and kept for the life of the process."""
    with _load_lock:
        if key not in _environments:
            _environments[key] = _build(key)
        return _environments[key]


def _build(key: str) -> Any:
    import verifiers as vf

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "a verifiers environment must first be loaded in the main thread (its constructor installs signal "
            "handlers): load the task 'verifiers' before scoring its rows"
        )
    spec = json.loads(key)
    module_name, _, attr = spec["load"].partition(":")
    with _signal_handlers_kept():
        env = getattr(import_from_cwd(module_name), attr)(**spec["args"])
    if not isinstance(env, vf.MultiTurnEnv):
        raise ValueError(
            f"{spec['load']} returned {type(env).__name__}, not a verifiers SingleTurnEnv or MultiTurnEnv"
        )
    if isinstance(env, vf.ToolEnv) or env.tool_defs:
        raise ValueError(
            f"{spec['load']}: {type(env).__name__} calls tools, which verifiers reads from structured tool calls "
            "of an OpenAI-style server; the policy's turns here are plain text, so no tool would ever run"
        )
    return env


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """verifiers' Environment replaces the SIGINT and SIGTERM handlers (its teardown, then exit 143); the run keeps
    its own, so Ctrl-C still stops training with its one-line resume hint. Its teardown still runs at exit."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run one of the environment's coroutines to its end on the one event loop its objects live on.

    The adapter's turns and the reward's scoring never overlap; a loop still busy (a scoring call abandoned at its
    deadline) is left to its thread and a new one takes over.
    """
    global _loop
    if _loop is None or _loop.is_running() or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coroutine)


def run_all(coroutines: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
    """``run`` of several coroutines at once (``env_response`` calls of one turn overlap their waits)."""

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*coroutines))

    return run(gather())


def vf_input(env: Any, row: Mapping[str, Any]) -> dict[str, Any]:
    """The environment's own dataset row behind a task row: what verifiers' rollouts start from."""
    dataset = env.build_dataset() if row["vf_split"] == "dataset" else env.build_eval_dataset()
    return dataset[int(row["vf_index"])]


@dataclass(eq=False)
class Episode:
    """One episode's vf State, the messages its next policy turn answers, and its rubric scores once scored."""

    state: Any
    prompt: list[Any]
    result: tuple[float, dict[str, float]] | None = None


@functools.cache
def _no_client() -> Any:
    from verifiers.legacy.clients import Client

    class NoClient(Client):
        """The policy's turns come from the run's own engine; an environment that asks a client for a model
        response itself (a simulated user, a judge inside env_response) has nothing to call."""

        def setup_client(self, config: Any) -> None:
            return None

        async def get_response(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                "this verifiers environment asks for a model response itself (get_model_response); here the "
                "policy's turns come from the training engine and there is no client for other calls"
            )

        async def to_native_tool(self, tool: Any) -> Any:
            raise NotImplementedError

        async def to_native_prompt(self, messages: Any) -> Any:
            raise NotImplementedError

        async def get_native_response(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        async def raise_from_native_response(self, response: Any) -> None:
            raise NotImplementedError

        async def from_native_response(self, response: Any) -> Any:
            raise NotImplementedError

        async def close(self) -> None:
            return None

    return NoClient(None)


async def new_episode(env: Any, row: Mapping[str, Any]) -> Episode:
    """A fresh State of ``row``'s problem, through ``init_state`` and ``setup_state`` (a vf.Error there is kept in
    the state, as verifiers' rollout keeps it, and its ``has_error`` stop ends the episode after the first turn)."""
    import verifiers as vf

    state = await env.init_state(vf_input(env, row), _no_client(), POLICY)
    state["timing"].generation.start = time.time()
    try:
        state = await env.setup_state(state) or state
    except vf.Error as exc:
        state["error"] = exc
    return Episode(state, list(state["prompt"]))


def stop_strings(env: Any) -> tuple[str, ...]:
    """The environment's ``sampling_args["stop"]``: where the server it was written for ends a model's turn."""
    stop = (env.sampling_args or {}).get("stop") or ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def model_text(env: Any, text: str) -> str:
    """The turn as that server returns it: the text before its first stop string (which it leaves out)."""
    cuts = [text.find(s) for s in stop_strings(env) if s in text]
    return text[: min(cuts)] if cuts else text


async def add_turn(env: Any, episode: Episode, text: str) -> None:
    """The policy's ``text`` as the model's response to ``episode.prompt``, through the env's add_model_response."""
    from verifiers.legacy.types import Response, ResponseMessage

    message = ResponseMessage(content=model_text(env, text), finish_reason="stop", is_truncated=False)
    response = Response(id=uuid.uuid4().hex, created=int(time.time()), model=POLICY, message=message)
    await env.add_model_response(episode.state, episode.prompt, response)


class EpisodeRecords:
    """Episodes by the object that stands for each: the runner's list of the episode's turns, which the episode's
    sample carries to the reward as ``turns`` (the sample itself when it has none). Kept by identity, not by
    content, as two episodes of a prompt may have the same turns and different states."""

    def __init__(self, capacity: int = _CAPACITY):
        self._capacity = capacity
        self._by_id: OrderedDict[int, tuple[Any, Episode]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, anchor: Any, episode: Episode) -> None:
        with self._lock:  # the anchor is held, so its id names no other object while it is here
            self._by_id[id(anchor)] = (anchor, episode)
            self._by_id.move_to_end(id(anchor))
            while len(self._by_id) > self._capacity:
                self._by_id.popitem(last=False)

    def get(self, anchor: Any) -> Episode | None:
        with self._lock:
            held = self._by_id.get(id(anchor))
        return held[1] if held is not None and held[0] is anchor else None


RECORDS = EpisodeRecords()
