"""Verifier throughput on this machine: math completions, sandboxed code executions, reasoning-gym scores.

    python benchmarks/verifiers.py [--workers 2] [--jobs 200]

Pools are started (and their imports paid) before timing; start-up is reported on its own line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reasoning_gym import create_dataset  # noqa: E402

from rewards.code import PRELOAD, function_tests_job, pass_fractions  # noqa: E402
from rewards.logic import reasoning_gym_scores  # noqa: E402
from rewards.math import score_answers  # noqa: E402
from rewards.sandbox.pool import SandboxPool  # noqa: E402


def rate(label: str, count: int, run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    print(f"{label:<58} {count / seconds:>9.1f} /s   ({count} in {seconds:.2f} s)")
    return seconds


def started_pool(preload: tuple[str, ...], workers: int) -> SandboxPool:
    pool = SandboxPool(preload, workers=workers)
    started = time.perf_counter()
    pool.map([function_tests_job("", [])] * workers)
    print(f"{'  start-up of ' + str(workers) + ' zygotes preloading ' + (preload[0] if preload else '-'):<58}"
          f" {time.perf_counter() - started:>9.2f} s")
    return pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    n = args.jobs
    print(f"{os.cpu_count()} CPUs, {args.workers} sandbox workers\n")

    print("math_accuracy")
    completions = [f"<think>{i} + {i} = {2 * i}</think><answer>{2 * i}</answer>" for i in range(20_000)]
    golds = [str(2 * i) for i in range(20_000)]
    from rewards.math import extract_answer

    rate("  plain numbers (in-process fast path)", len(completions),
         lambda: score_answers([extract_answer(c) for c in completions], golds))
    math_pool = started_pool(("rewards.math:warm_up",), args.workers)
    latex = ["\\frac{1}{2}", "0.5", "\\sqrt{8}", "x^2+1", "[1,2)", "10\\%"] * (n // 6)
    gold = ["0.5", "\\frac{1}{2}", "2\\sqrt{2}", "1+x^2", "[1,2)", "0.1"] * (n // 6)
    rate("  LaTeX/symbolic answers (math-verify in the sandbox)", len(latex),
         lambda: score_answers(latex, gold, pool=math_pool))
    math_pool.close()

    print("\ncode_tests")
    code_pool = started_pool(PRELOAD, args.workers)
    trivial = [function_tests_job("def f(x):\n    return x\n", ["assert f(1) == 1"])]
    outcomes = []
    seconds = rate(f"  sandbox executions, {args.workers} workers (trivial program, 1 test)", n,
                   lambda: outcomes.extend(code_pool.map(trivial * n)))
    overhead = sum(o.seconds for o in outcomes) / len(outcomes)
    print(f"{'  per-execution overhead (judge + candidate processes)':<58} {overhead * 1000:>9.1f} ms")
    print(f"{'  wall time per execution per worker':<58} {seconds / n * args.workers * 1000:>9.1f} ms")
    program = "<answer>\n```python\ndef add(a, b):\n    return a + b\n```\n</answer>"
    sample = {"tests": [f"assert add({i}, 1) == {i + 1}" for i in range(10)]}
    rate("  completions scored, 10 asserts each", n,
         lambda: pass_fractions([program] * n, [sample] * n, pool=code_pool))
    io_sample = {"io_tests": [{"input": f"{i}\n", "output": f"{2 * i}"} for i in range(5)]}
    io_program = "<answer>\n```python\nprint(2 * int(input()))\n```\n</answer>"
    rate("  completions scored, 5 stdin/stdout cases each", n // 2,
         lambda: pass_fractions([io_program] * (n // 2), [io_sample] * (n // 2), pool=code_pool))
    code_pool.close()

    print("\nlogic_accuracy")
    logic_pool = started_pool(("rewards.logic", "reasoning_gym"), args.workers)
    entries = list(create_dataset("countdown", seed=0, size=n))
    rows = [{"dataset": "countdown", "question": e["question"], "answer": e["answer"],
             "metadata": json.dumps(e["metadata"])} for e in entries]
    answers = [f"<answer>{e['answer']}</answer>" for e in entries]
    rate("  countdown answers scored (reasoning-gym in the sandbox)", n,
         lambda: reasoning_gym_scores(answers, rows, pool=logic_pool))
    logic_pool.close()


if __name__ == "__main__":
    main()
