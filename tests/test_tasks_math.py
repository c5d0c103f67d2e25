"""Math tasks: answers parsed right, gold answers verified as right and others as wrong by the tasks' rewards."""

import re
from pathlib import Path

import pytest

from rewards import get_reward
from tasks import load_task
from tasks.competition_math import last_boxed
from tasks.gsm8k import parse_gsm8k_answer
from tasks.registry import task_rewards

FIXTURES = Path(__file__).parent / "fixtures"


def verdicts(name, rows, answers):
    """Every configured reward of task ``name`` on completions that answer ``answers``."""
    completions = [f"<think>\nworking\n</think>\n<answer>{answer}</answer>" for answer in answers]
    return [get_reward(reward)(completions, rows) for reward in task_rewards(name)]


def assert_gold_right_and_wrong_wrong(name, dataset, wrong):
    rows = dataset.to_list()
    for scores in verdicts(name, rows, [row["answer"] for row in rows]):
        assert scores == [1.0] * len(rows)
    for scores in verdicts(name, rows, [wrong] * len(rows)):
        assert scores == [0.0] * len(rows)
    if "solution" in dataset.column_names:
        completions = [row["solution"] for row in rows]
        for reward in task_rewards(name):
            assert get_reward(reward)(completions, rows) == [1.0] * len(rows)


def test_arithmetic_answers_are_exact():
    dataset = load_task("arithmetic", "train", 20, digits=3, ops="+-*")
    for row in dataset:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", row["prompt"][-1]["content"]).groups()
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert_gold_right_and_wrong_wrong("arithmetic", dataset, "-1")


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("48/2 = <<48/2=24>>24 clips.\n#### 72", "48/2 = 24 clips.", "72"),
        ("So 1,250*30 = 37,500.\n#### 37,500", "So 1,250*30 = 37,500.", "37500"),
        ("#### -3", "", "-3"),
    ],
)
def test_gsm8k_answer_parsing(text, reasoning, answer):
    assert parse_gsm8k_answer(text) == (reasoning, answer)


@pytest.mark.parametrize("text", ["The answer is 5.", "Done.\n####   "])
def test_gsm8k_answer_without_final_line_is_an_error(text):
    with pytest.raises(ValueError, match="####"):
        parse_gsm8k_answer(text)


def test_gsm8k_eval_is_the_test_file_and_train_never_repeats_it():
    source = str(FIXTURES / "gsm8k")
    held_out = load_task("gsm8k", "eval", 3, source=source)
    assert sorted(held_out["answer"]) == ["18", "3", "70000"]
    with pytest.raises(
        ValueError, match="only 5 problems"
    ):  # 6 train rows, one of them a test problem respaced
        load_task("gsm8k", "train", 6, source=source)
    train = load_task("gsm8k", "train", 5, source=source)
    assert "37500" in train["answer"] and "18" not in train["answer"]
    assert all("<<" not in row["solution"] for row in train)
    assert_gold_right_and_wrong_wrong("gsm8k", train, "123456")
    assert_gold_right_and_wrong_wrong("gsm8k", held_out, "123456")


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        (r"so $x = \boxed{\frac{7}{12}}$.", r"\frac{7}{12}"),
        (r"first \boxed{2}, then \boxed{3}", "3"),
        (r"\fbox{ 5 }", "5"),
        (r"\boxed {\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{4} and a cut-off \boxed{\frac{1", "4"),
        ("no box here", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_math_local_folder_levels_and_answers():
    source = str(FIXTURES / "math")
    train = load_task("math", "train", 5, source=source)  # the sixth train row has no box and is dropped
    assert sorted(train["answer"]) == ["12", "3", "3", "8", r"\frac{7}{12}"]
    by_level = load_task("math", "train", 2, source=source, levels=[2, 4])
    assert sorted(by_level["answer"]) == ["3", r"\frac{7}{12}"]
    held_out = load_task("math", "eval", 3, source=source)
    assert sorted(held_out["answer"]) == ["10", "55", r"\frac{1}{3}"]
    assert_gold_right_and_wrong_wrong("math", train, "999")
    assert_gold_right_and_wrong_wrong("math", held_out, "999")


def test_math_single_parquet_file_is_split_by_hash_and_keeps_its_answer_column():
    source = str(FIXTURES / "math500.parquet")
    train = load_task("math", "train", 15, source=source)
    held_out = load_task("math", "eval", 1, source=source)
    assert held_out["answer"] == ["41"]  # legs 9 and 40
    assert_gold_right_and_wrong_wrong("math", train, "1000")


def test_gsm_symbolic_rows_carry_a_worked_solution():
    dataset = load_task("gsm_symbolic", "eval", 4, seed=3)
    assert all(row["solution"].endswith(f"<answer>{row['answer']}</answer>") for row in dataset)
    assert_gold_right_and_wrong_wrong("gsm_symbolic", dataset, "-987654")


def test_basic_arithmetic_passes_options_to_reasoning_gym():
    dataset = load_task(
        "basic_arithmetic", "train", 6, min_terms=2, max_terms=2, max_digits=1, operators=("+",)
    )
    for row in dataset:
        numbers = re.findall(r"\d+", row["prompt"][-1]["content"])
        assert len(numbers) == 2 and all(len(n) == 1 for n in numbers)
    assert_gold_right_and_wrong_wrong("basic_arithmetic", dataset, "1000")
    with pytest.raises(ValueError, match="settable"):
        load_task("basic_arithmetic", "train", 2, terms=3)
