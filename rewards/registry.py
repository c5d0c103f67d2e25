"""Name -> reward function.

A reward is ``fn(completions, samples) -> list[float | None]``: one score per completion, ``None`` where
the reward does not apply to that sample (e.g. a math reward on a code row). Configs refer to rewards by a
registered name, by ``package.module:function`` (a module in the working directory included), or by an entry point in the group ``rlreason.rewards``, so a
user's reward never needs a change to this package.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

RewardFn = Callable[[list[str], list[dict[str, Any]]], list[float | None]]

ENTRY_POINT_GROUP = "rlreason.rewards"
_REWARDS: dict[str, RewardFn] = {}
_FIELDS: dict[str, tuple[str, ...]] = {}
_builtins_loaded = False


def reward(name: str, fields: tuple[str, ...] = ()) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` under ``name``; re-registering the same name with another function is an error.

    ``fields``: sample fields the reward cannot work without, so a run whose dataset lacks them is refused
    before a model loads instead of scoring None forever.
    """

    def register(fn: RewardFn) -> RewardFn:
        existing = _REWARDS.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        _REWARDS[name] = fn
        _FIELDS[name] = tuple(fields)
        return fn

    return register


def import_modules(package: str, skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (but ``skip``), so the registering decorators in them run."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        import_modules("rewards", skip=("registry",))
        _builtins_loaded = True


def import_from_cwd(module_name: str) -> ModuleType:
    """Import ``module_name``, finding a top-level module in the working directory as ``python -m`` would.

    A console script (``rlreason train``) starts without the working directory on ``sys.path``, so a user's
    ``my_rewards.py`` next to their config would not be found. The directory is appended, not put first, and only
    when the module is found nowhere else, so it never shadows an installed package.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.partition(".")[0] or cwd in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def _from_import_path(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    try:
        module = import_from_cwd(module_name)
    except ImportError as exc:
        raise KeyError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise KeyError(f"reward {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def reward_names() -> list[str]:
    """Every name a config may use: built-in, imported, and published through entry points."""
    _load_builtins()
    names = set(_REWARDS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(names)


def get_reward(name: str) -> RewardFn:
    """Look a reward up by registered name, ``module:function`` path, or entry point name."""
    if ":" in name:
        return _from_import_path(name)
    _load_builtins()
    if name in _REWARDS:
        return _REWARDS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    close = difflib.get_close_matches(name, reward_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown reward {name!r}{hint} (known: {', '.join(reward_names())})")


def registered_name(fn: RewardFn) -> str | None:
    """The name ``fn`` was registered under with ``@reward``, if it was."""
    return next((name for name, registered in _REWARDS.items() if registered is fn), None)


def required_fields(name: str) -> tuple[str, ...]:
    """The sample fields a registered reward declared it needs (none for imported or entry-point rewards)."""
    _load_builtins()
    return _FIELDS.get(name, ())
