"""Hostile completions: each must score what an honest verifier would give, in bounded time, leaving this
process, its files and the sandbox unharmed.

The sandbox must be in strong isolation for these programs to be run at all (``strong`` below fails first
otherwise), so a broken sandbox fails the suite instead of running a fork bomb on the host.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from rewards.code import code_pool, function_tests_job, pass_fractions
from rewards.format import think_format
from rewards.math import math_accuracy
from rewards.sandbox.pool import Limits
from rewards.sandbox.zygote import JOB_UID_BASE

TIMEOUT_S = 1.5
SLACK_S = 4.0  # zygote start-up and process teardown on a loaded 2-core machine
GOOD = "def f(x):\n    return 2 * x\n"
TESTS = ["assert f(2) == 4", "assert f(5) == 10"]


def sandbox_processes() -> list[int]:
    """Live processes started by this test process's sandboxes and running as a job: none between jobs."""
    parents, uids = {}, {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            uids[int(proc.name)] = int(next(line for line in (proc / "status").read_text().splitlines()
                                            if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, IndexError):
            continue

    def descends_from_us(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, uid in uids.items() if uid >= JOB_UID_BASE and descends_from_us(pid)]


def score(program: str, tests: list[str] = TESTS, timeout: float = TIMEOUT_S) -> float:
    """The code_tests score of ``program``, asserting the wall time is bounded and nothing was harmed."""
    completion = f"<think>I will write it.</think>\n<answer>\n```python\n{program}\n```\n</answer>"
    started = time.monotonic()
    [result] = pass_fractions([completion], [{"tests": tests, "timeout": timeout}])
    assert time.monotonic() - started < timeout + SLACK_S
    assert_unharmed()
    return result


def assert_unharmed() -> None:
    assert sandbox_processes() == []
    completion = f"<answer>\n```python\n{GOOD}```\n</answer>"
    assert pass_fractions([completion], [{"tests": TESTS}]) == [1.0]


@pytest.fixture(scope="module", autouse=True)
def strong() -> None:
    outcome = code_pool().run(function_tests_job(GOOD, TESTS))
    assert code_pool().strong, "the hostile suite only runs under strong isolation"
    assert outcome.results == [True, True]


# ---------------------------------------------------------------- resources


def test_fork_bomb():
    assert (
        score(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n" + GOOD
        )
        == 0.0
    )


def test_busy_loop():
    assert score("while True:\n    pass\n" + GOOD) == 0.0


def test_busy_loop_inside_the_function_fails_only_its_tests():
    program = "def f(x):\n    while x == 5:\n        pass\n    return 2 * x\n"
    assert score(program) == 0.5


def test_allocating_20_gb():
    assert score("block = bytearray(20 * 2**30)\n" + GOOD) == 0.0


def test_sleep_1000():
    assert score("import time\ntime.sleep(1000)\n" + GOOD) == 0.0


def test_printing_1_gb():
    assert score("import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 2**20)\n" + GOOD) == 0.0


def test_infinite_recursion():
    assert score("def f(x):\n    return f(x)\n") == 0.0


def test_recursion_past_the_c_stack():
    program = "import sys\nsys.setrecursionlimit(10**8)\ndef g(n):\n    return g(n + 1) + 1\ng(0)\n" + GOOD
    assert score(program) == 0.0


def test_ctypes_segfault():
    assert score("import ctypes\nctypes.string_at(0)\n" + GOOD) == 0.0


def test_threads_that_outlive_the_tests_neither_hang_nor_help():
    sleeper = "import threading, time\nthreading.Thread(target=time.sleep, args=(1000,)).start()\n"
    assert score(sleeper + GOOD) == 1.0
    patcher = (
        "import builtins, threading\n"
        "def patch():\n    while True:\n        builtins.abs = lambda x: 0\n"
        "threading.Thread(target=patch, daemon=True).start()\n"
        "def f(x):\n    return 0.5\n"
    )
    assert score(patcher, ["assert abs(f(1) - 2) < 1e-9"]) == 0.0


# ---------------------------------------------------------------- the host


def test_rm_rf_home(tmp_path, monkeypatch):
    canary = tmp_path / "home" / "precious.txt"
    canary.parent.mkdir()
    canary.write_text("keep me")
    monkeypatch.setenv("HOME", str(canary.parent))
    assert score(f"import os\nos.system('rm -rf ~ {canary.parent}')\n") == 0.0
    assert canary.read_text() == "keep me"


def test_writing_outside_the_working_directory(tmp_path):
    targets = [
        tmp_path / "escaped.txt",
        Path("/tmp") / f"rlreason-escape-{os.getpid()}",
        Path.cwd() / "escaped.txt",
    ]
    program = "".join(
        f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass\n" for t in targets
    )
    assert score(program + GOOD) == 1.0  # the writes fail; the program still solves the task
    assert not any(t.exists() for t in targets)


def test_socket_to_localhost():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        program = (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
            + GOOD
        )
        assert score(program) == 0.0
        with pytest.raises(TimeoutError):
            listener.accept()


def test_killing_the_parent_and_everything_else():
    program = (
        "import os, signal\n"
        "for pid in [os.getppid(), 1, -1, *range(2, 5000)]:\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "def f(x):\n    return x\n"
    )
    assert score(program) == 0.0


def test_environment_secrets_do_not_reach_the_job(monkeypatch):
    monkeypatch.setenv("RLREASON_TEST_SECRET", "hunter2")
    code_pool().close()  # new zygotes start from this environment
    program = (
        f"import os, glob\nprint(dict(os.environ))\n"
        f"for path in ['/proc/self/environ', '/proc/1/environ', '/proc/{os.getpid()}/environ',"
        f" *glob.glob('/proc/*/environ')]:\n"
        f"    try:\n        print(open(path, 'rb').read())\n    except OSError as error:\n        print(error)\n"
    )
    outcome = code_pool().run(function_tests_job(program, [], Limits(timeout_s=TIMEOUT_S)))
    assert b"PATH" in outcome.output and b"hunter2" not in outcome.output


# ---------------------------------------------------------------- the verdict


def test_exiting_before_the_tests_is_not_a_pass():
    assert score(GOOD + "import sys\nsys.exit(0)\n") == 0.0
    assert score(GOOD + "import os\nos._exit(0)\n") == 0.0


def test_always_equal_objects():
    always = "class Yes:\n    def __eq__(self, other):\n        return True\n    __ne__ = __lt__ = __eq__\n"
    assert score(always + "def f(x):\n    return Yes()\n") == 0.0
    assert (
        score(
            "class I(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return I(0)\n"
        )
        == 0.0
    )
    assert score(always + "def f(x):\n    return [Yes()]\n", ["assert f(2) == [4]"]) == 0.0


def test_raising_skiptest():
    assert score("import unittest\ndef f(x):\n    raise unittest.SkipTest('later')\n") == 0.0


def test_writing_conftest():
    program = (
        "open('conftest.py', 'w').write('def pytest_runtest_call(item):\\n    pass\\n')\n"
        "def f(x):\n    return 0\n"
    )
    assert score(program) == 0.0
    assert (
        not (Path.cwd() / "conftest.py").exists()
        or "pytest_runtest_call" not in (Path.cwd() / "conftest.py").read_text()
    )


def test_redefining_the_checker_or_its_helpers():
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n\ncheck(f)\n"
    assert score("def check(candidate):\n    pass\ndef f(x):\n    return 0\n", [humaneval]) == 0.0
    patch_builtins = "import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 0.5\n"
    assert score(patch_builtins, ["assert abs(f(1) - 2) < 1e-9"]) == 0.0
    patch_module = "import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n    return 0.5\n"
    assert score(patch_module, ["import math\nassert math.isclose(f(1), 2)"]) == 0.0
    patch_harness = (
        "import sys\ndef f(x):\n    harness = sys.modules['rewards.sandbox.harness']\n"
        "    harness._passes = lambda run: True\n    harness.GUARD = 'nothing'\n    return 0\n"
    )
    assert score(patch_harness, ["assert f(1) == 2", "assert f(2) == 4"]) == 0.0
    tracer = (
        "import sys\ndef skip(frame, event, arg):\n    return None\nsys.settrace(skip)\n"
        "def f(x):\n    return 0\n"
    )
    assert score(tracer) == 0.0


# ---------------------------------------------------------------- math answers


def math_score(completion: str, gold: str = "68") -> float:
    started = time.monotonic()
    [result] = math_accuracy([completion], [{"answer": gold}])
    assert time.monotonic() - started < 10.0
    return result


def test_tower_of_powers():
    assert math_score("<answer>9**9**9**9</answer>", "3") == 0.0
    assert math_score(r"\boxed{9^{9^{9^{9}}}}", "3") == 0.0


def test_boxed_nested_10000_deep():
    assert math_score(r"\boxed{" * 10_000 + "68") == 0.0
    assert math_score(r"\boxed{" * 10_000 + "68" + "}" * 10_000) == 0.0


def test_one_megabyte_completion():
    junk = "blah " * 200_000
    assert math_score(junk) == 0.0
    assert math_score(f"<think>{junk}</think><answer>68</answer>") == 1.0
    assert think_format([junk * 1], [{}]) == [0.0]


def test_unicode_look_alike_digits():
    for look_alike in ("６８", "٦٨", "𝟔𝟖", "6⁸", "6８"):
        assert math_score(f"<answer>{look_alike}</answer>") == 0.0


def test_empty_text():
    assert math_score("") == 0.0
    assert think_format([""], [{}]) == [0.0]


def test_answer_only_inside_think():
    assert math_score("<think>The answer is 68.</think>") == 0.0
    assert math_score("<think>The answer is \\boxed{68}.</think><answer></answer>") == 0.0
    assert math_score("<think>68 <answer>68</answer>") == 0.0


def test_empty_think_block_earns_accuracy_but_no_format():
    completion = "<think></think><answer>68</answer>"
    assert math_score(completion) == 1.0
    assert think_format([completion], [{}]) == [0.0]


def test_several_answer_blocks_or_boxes():
    assert math_score("<think>t</think><answer>67</answer><answer>68</answer>") == 0.0
    assert math_score(r"\boxed{67} or rather \boxed{68}") == 0.0
    assert math_score(r"\boxed{68} so \boxed{ 68 }") == 1.0


def test_hedged_answers():
    assert math_score("<answer>67 or 68</answer>") == 0.0
    assert math_score("<answer>68 or 67</answer>") == 0.0
    assert math_score(r"\boxed{68 \text{ or } 67}") == 0.0
    assert math_score("It is 67 or 68") == 0.0


# ---------------------------------------------------------------- reaching into the judge

NONCE_FORGER = """
import gc, os, sys
def _nonce():
    frame = sys._getframe()
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if isinstance(value, dict) and isinstance(value.get("nonce"), str):
                return value["nonce"]
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict) and isinstance(obj.get("nonce"), str):
            return obj["nonce"]
nonce = _nonce()
for fd in range(1, 12):
    try:
        os.write(fd, ("\\n%s true\\n" % nonce).encode() * 20)
    except (OSError, TypeError):
        pass
"""

TEST_REWRITER = """
import gc, sys
def _rewrite(items):
    for i, item in enumerate(items):
        if type(item).__name__ == "code":
            items[i] = compile("pass", "<rewritten>", "exec")
        elif type(item) is tuple and any(type(x).__name__ == "code" for x in item):
            items[i] = tuple(compile("pass", "<rewritten>", "exec") if type(x).__name__ == "code" else x
                             for x in item)
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        if isinstance(value, list):
            _rewrite(value)
    frame = frame.f_back
for obj in gc.get_objects():
    if isinstance(obj, list):
        _rewrite(obj)
"""


def test_verdict_lines_forged_with_the_nonce_found_in_memory():
    wrong = "def f(x):\n    return 0\n"
    assert score(NONCE_FORGER + wrong) == 0.0
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n\ncheck(f)\n"
    assert score(NONCE_FORGER + wrong, [humaneval]) == 0.0


def test_tests_rewritten_through_the_frames():
    assert score(TEST_REWRITER + "def f(x):\n    return 0\n") == 0.0


def test_the_program_never_holds_the_tests():
    marker = "expected-" + "value-91c2"
    finder = (
        "import gc\ndef f(x):\n"
        "    needle = ''.join(['expected-', 'value-91c2'])  # not folded into one constant\n"
        "    for obj in gc.get_objects():\n"
        "        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()\n"
        "        if any(isinstance(item, str) and needle in item for item in items):\n"
        "            return 'seen'\n"
        "    return 'unseen'\n"
    )
    assert score(finder, [f"assert f(1) == 'unseen' or f(1) == '{marker}'"]) == 1.0
