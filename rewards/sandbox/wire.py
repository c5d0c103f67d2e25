"""Plain data between a judge and a candidate process: JSON with tags, exact built-in types, size and depth caps.

What crosses: None, bool, int, float, complex, str, bytes, bytearray, and list, tuple, set, frozenset, dict of
those, nested at most MAX_DEPTH deep, each message at most MAX_MESSAGE_BYTES of JSON. Types are checked
exactly (``type(v) is int``, never ``isinstance``), so no subclass, proxy or object with custom methods
can be sent; a decoded message is built by this module from JSON, so nothing the sender wrote runs in the
receiver. Anything else raises WireError.
"""

from __future__ import annotations

import json
import os
import struct
from base64 import b64decode, b64encode
from typing import Any

MAX_MESSAGE_BYTES = 16 << 20
MAX_DEPTH = 100
_SCALARS = (bool, int, float, str)
_SEQUENCES = {tuple: "tuple", set: "set", frozenset: "frozenset"}
_BINARY = {bytes: "bytes", bytearray: "bytearray"}
_BUILD = {"tuple": tuple, "set": set, "frozenset": frozenset, "bytes": bytes, "bytearray": bytearray}


class WireError(ValueError):
    """A message that is not plain data, too large or too deep, or a channel that closed mid-message."""


def encode(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON-compatible data; raises WireError when it is not plain data."""
    kind = type(value)
    if value is None or kind in _SCALARS:
        return value
    if depth >= MAX_DEPTH:
        raise WireError(f"data nested deeper than {MAX_DEPTH}")
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind in _SEQUENCES:
        return {_SEQUENCES[kind]: [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind in _BINARY:
        return {_BINARY[kind]: b64encode(value).decode()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise WireError(f"a {kind.__name__} is not plain data")


def decode(data: Any, depth: int = 0) -> Any:
    """The value ``encode`` made ``data`` from; raises WireError on anything ``encode`` cannot produce."""
    kind = type(data)
    if data is None or kind in _SCALARS:
        return data
    if depth >= MAX_DEPTH:
        raise WireError(f"data nested deeper than {MAX_DEPTH}")
    if kind is list:
        return [decode(item, depth + 1) for item in data]
    if kind is not dict or len(data) != 1:
        raise WireError("not plain data")
    ((tag, body),) = data.items()
    try:
        if tag in ("tuple", "set", "frozenset") and type(body) is list:
            return _BUILD[tag](decode(item, depth + 1) for item in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
        if tag in _BUILD and type(body) is str:
            return _BUILD[tag](b64decode(body, validate=True))
        if tag == "complex" and type(body) is list and len(body) == 2 and all(type(x) is float for x in body):
            return complex(*body)
    except (TypeError, ValueError) as exc:  # unhashable keys or set items, bad base64
        raise WireError(f"bad {tag}: {exc}") from exc
    raise WireError(f"not plain data (tag {tag!r})")


def send(fd: int, value: Any) -> None:
    """Write ``value`` as one length-prefixed message."""
    try:
        body = json.dumps(encode(value), separators=(",", ":")).encode()
    except ValueError as exc:  # an int too long to print, or a WireError from encode
        raise WireError(str(exc)) from exc
    if len(body) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(body)} bytes (at most {MAX_MESSAGE_BYTES})")
    view = memoryview(struct.pack(">I", len(body)) + body)
    while view:
        view = view[os.write(fd, view):]


def _read(fd: int, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the channel closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def receive(fd: int) -> Any:
    """The next message; raises EOFError when the other side has closed, WireError when it is not plain data."""
    (size,) = struct.unpack(">I", _read(fd, 4))
    if size > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {size} bytes (at most {MAX_MESSAGE_BYTES})")
    try:
        data = json.loads(_read(fd, size))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"not JSON: {exc}") from exc
    return decode(data)
