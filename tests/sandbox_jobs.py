"""Sandbox jobs for tests/test_rewards_sandbox.py (a job is any importable generator function)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any


def echo(items: list[Any], say: str = "", sleep: float = 0, connect: bool = False) -> Iterator[Any]:
    """Print ``say``, yield ``items``, then optionally misbehave."""
    print(say, flush=True)
    if connect:
        try:
            socket.socket()
        except PermissionError as error:
            print(error, flush=True)
    yield from items
    time.sleep(sleep)
