"""Ctrl-C that ends a training run even when its KeyboardInterrupt is lost on the way.

CPython raises KeyboardInterrupt wherever the main thread is when the signal's handler runs; inside a finalizer (an
object's ``__del__``, a weakref callback) the exception is printed as ignored and dropped, and the run would train
on. So the handler also records the request, and the trainer raises it again between steps."""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = threading.Event()


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """Ctrl-C raises KeyboardInterrupt, as by default, and is remembered (main thread only, like any handler)."""
    _requested.clear()
    signal.signal(signal.SIGINT, _on_interrupt)


def raise_if_requested() -> None:
    """KeyboardInterrupt if Ctrl-C came since ``install``, whatever became of the first one."""
    if _requested.is_set():
        raise KeyboardInterrupt
