"""The judge/candidate split: the plain-data wire, and what tests can do with a program across it."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from rewards.code import code_tests
from rewards.sandbox import wire
from rewards.sandbox.harness import free_names
from rewards.sandbox.wire import WireError


def answer(program: str) -> str:
    return f"<answer>\n```python\n{program}```\n</answer>"


def roundtrip(value):
    return wire.decode(json.loads(json.dumps(wire.encode(value))))


def test_plain_data_crosses_with_its_exact_types():
    value = {1: (2.5, "x", None), "k": [True, {3, 4}, frozenset({"a"})], (1, 2): b"\x00\xff",
             "ba": bytearray(b"ab"), "c": 1 - 2j, "n": [[[]]], "big": 10**40}
    back = roundtrip(value)
    assert back == value
    assert [type(v) for v in back[1]] == [float, str, type(None)]
    assert type(back["k"][1]) is set and type(back["k"][2]) is frozenset and type(back["ba"]) is bytearray
    assert math.isnan(roundtrip(float("nan"))) and roundtrip(float("-inf")) == float("-inf")


def test_anything_else_is_refused_on_both_ends():
    class Int(int):
        pass

    for bad in (Int(1), object(), [lambda: 0], {"a": range(3)}, 10**5000):
        with pytest.raises(WireError):
            wire.send(os.open(os.devnull, os.O_WRONLY), bad)
    nested: list = []
    for _ in range(wire.MAX_DEPTH + 1):
        nested = [nested]
    with pytest.raises(WireError, match="deeper"):
        wire.encode(nested)
    for forged in ({"tuple": 3}, {"evil": []}, {"dict": [[[1], 2]]}, {"set": [[1]]}, {"bytes": "!!"},
                   {"complex": ["1", 2]}, {"tuple": [], "set": []}):
        with pytest.raises(WireError):
            wire.decode(forged)


def test_oversized_and_truncated_messages():
    read, write = os.pipe()
    os.write(write, (wire.MAX_MESSAGE_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(WireError, match="bytes"):
        wire.receive(read)
    os.write(write, (10).to_bytes(4, "big") + b"[1,")
    os.close(write)
    with pytest.raises(EOFError):
        wire.receive(read)


def test_free_names_are_what_the_test_uses_but_does_not_define():
    source = ("import math\nfrom x import y as z\nMETA = 1\ndef check(candidate):\n    v = candidate(1)\n"
              "    assert helper(v) == math.pi\ncheck(entry)\ntry:\n    pass\nexcept ValueError as e:\n    pass\n")
    assert free_names(source) == {"helper", "entry"}


def test_exceptions_come_back_as_builtin_classes():
    expects_value_error = "try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError\n"
    raises = "def f(x):\n    raise ValueError('no')\n"
    custom = "class Bad(ValueError):\n    pass\ndef f(x):\n    raise Bad()\n"
    quiet = "def f(x):\n    return -1\n"
    exits = "import sys\ndef f(x):\n    sys.exit(0)\n"
    swallowing = "try:\n    f(1)\nexcept Exception:\n    pass\n"
    rows = [{"tests": [expects_value_error]}] * 3 + [{"tests": [swallowing]}]
    assert code_tests([answer(p) for p in (raises, custom, quiet, exits)], rows) == [1.0, 1.0, 0.0, 0.0]


def test_mutated_arguments_are_written_back():
    program = "def f(xs, table, seen):\n    xs.sort()\n    table['n'] = len(xs)\n    seen.add(0)\n"
    test = "xs, t, s = [3, 1, 2], {}, set()\nf(xs, t, seen=s)\nassert xs == [1, 2, 3] and t == {'n': 3} and s == {0}"
    assert code_tests([answer(program)], [{"tests": [test]}]) == [1.0]


def test_tests_may_use_modules_only_the_program_imported():
    program = "import math\ndef f(x):\n    return math.sqrt(x)\n"
    assert code_tests([answer(program)], [{"tests": ["assert math.isclose(f(4), 2.0)"]}]) == [1.0]


def test_results_that_are_not_plain_data_fail_the_test():
    program = "def f(x):\n    return (i for i in range(x))\n"
    assert code_tests([answer(program)], [{"tests": ["try:\n    f(2)\nexcept Exception:\n    pass"]}]) == [0.0]


def test_a_candidate_that_dies_is_noticed_at_once():
    started = time.monotonic()
    program = "import os\ndef f(x):\n    os._exit(0)\n"
    assert code_tests([answer(program)], [{"tests": ["assert f(1) is None", "assert 1 == 1"], "timeout": 10}]) == [0.5]
    assert time.monotonic() - started < 5
