"""math_accuracy: equivalence classes math-verify decides, the in-process fast path, applicability."""

from __future__ import annotations

import pytest

from rewards.math import extract_answer, math_accuracy, parse_number, score_answers
from rewards.sandbox.pool import Outcome


class NoPool:
    """A pool that fails the test if used: plain numbers must be decided in-process."""

    def map(self, jobs):
        raise AssertionError(f"sandbox used for {jobs}")


@pytest.mark.parametrize(
    ("answer", "gold", "expected"),
    [
        ("68", "68", 1.0),
        ("+68", "68", 1.0),
        ("68.0", "68", 1.0),
        ("0.5", "1/2", 1.0),
        ("$68$", "68", 1.0),
        ("67", "68", 0.0),
        ("-3", "3", 0.0),
    ],
)
def test_plain_numbers_take_the_fast_path(answer, gold, expected):
    assert score_answers([answer], [gold], pool=NoPool()) == [expected]


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "0.75"),
    ("1,234", "1234"),
    ("10\\%", "10"),
    ("10\\%", "0.1"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("x^2+1", "1+x^2"),
    ("[1,2)", "[1,2)"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("(1, 2]", "(1,2]"),
    ("\\pi", "\\pi"),
    ("x = 5", "5"),
]
DIFFERENT = [
    ("\\frac{1}{3}", "0.5"),
    ("[1,2]", "[1,2)"),
    ("\\{1,3\\}", "\\{1,2\\}"),
    ("x^2-1", "x^2+1"),
    ("1,234", "1.234"),
    ("2^{10}", "1024"),  # the arithmetic is left to do: see test_the_question_restated_is_no_answer
]


def test_math_verify_equivalences():
    answers = [a for a, _ in EQUIVALENT + DIFFERENT]
    golds = [g for _, g in EQUIVALENT + DIFFERENT]
    assert score_answers(answers, golds) == [1.0] * len(EQUIVALENT) + [0.0] * len(DIFFERENT)


@pytest.mark.parametrize(("answer", "gold"), [("\\$18.90", "18.90"), ("18.90", "\\$18.90"), ("\\$18.90", "\\$18.90"),
                                           ("\\$\\frac{1}{2}", "0.5")])
def test_an_escaped_dollar_is_a_currency_sign_not_a_math_delimiter(answer, gold):
    assert score_answers([answer], [gold]) == [1.0]
    assert score_answers([answer], ["18.91"]) == [0.0]


@pytest.mark.parametrize(("answer", "gold"), [("1 000", "1000"), ("1\\,000", "1000"), ("14{,}916", "14916"),
                                           ("1000000", "1 000 000")])
def test_digit_groups_of_three_split_by_spaces_are_one_number(answer, gold):
    assert score_answers([answer], [gold], pool=NoPool()) == [1.0]


def test_digits_split_otherwise_are_not_joined():
    assert score_answers(["12 34", "1 0000"], ["1234", "10000"]) == [0.0, 0.0]


def test_reward_applies_to_rows_with_an_answer_only():
    completions = ["<answer>68</answer>"] * 4
    samples = [
        {"answer": "68", "task": "arithmetic"},
        {"tests": ["assert True"], "task": "mbpp"},
        {"answer": "68", "dataset": "countdown", "metadata": "{}", "task": "countdown"},  # reasoning-gym row
        {"answer": None, "task": "mixed"},
    ]
    assert math_accuracy(completions, samples) == [1.0, None, None, None]


def test_answers_too_long_or_missing_score_zero_without_the_sandbox():
    assert score_answers([None, "1" * 2000, "3 or 4"], ["1", "1", "3"], pool=NoPool()) == [0.0, 0.0, 0.0]


class YesPool:
    """A pool whose every job says "equivalent", recording the jobs it was given."""

    def __init__(self):
        self.jobs = []

    def map(self, jobs):
        self.jobs += jobs
        return [Outcome("ok", [True], b"", 0, 0.0) for _ in jobs]


def test_hedge_vetoed_unless_the_gold_hedges_too():
    assert score_answers(["3 or 4"], ["3"], pool=NoPool()) == [0.0]
    pool = YesPool()
    assert score_answers(["x = 1 or x = 2"], ["x = 2 or x = 1"], pool=pool) == [1.0]
    assert [job.args for job in pool.jobs] == [{"gold": "x = 2 or x = 1", "answer": "x = 1 or x = 2"}]


def test_parse_number():
    assert parse_number(" 3/4 ") == parse_number("0.75")
    assert parse_number("1/0") is None and parse_number("1e5") is None and parse_number("٣") is None


def test_extract_answer_feeds_majority_vote():
    assert extract_answer("<think>maybe 5</think><answer>6</answer>") == "6"
    assert extract_answer("So the sum is 68.") == "68"


@pytest.mark.parametrize(
    "answer, gold",
    [("572 * 655", "374660"), ("572*655", "374660"), ("572 \\times 655", "374660"), ("2^{10}", "1024"), ("40 + 45", "85"),
     ("x = 572 * 655", "374660"), ("$572 \\cdot 655$", "374660")],
)
def test_the_question_restated_is_no_answer(answer, gold):
    """An answer that still holds the question's arithmetic equals the gold symbolically; a policy trained on the
    multiplication task with a Python tool learned to answer so when the tool was taken away (0.86 "accuracy")."""
    assert math_accuracy([f"<think>compute</think><answer>{answer}</answer>"], [{"answer": gold}]) == [0.0]


def test_a_number_in_latex_still_answers_a_number():
    samples = [{"answer": "0.5"}, {"answer": "374660"}]
    assert math_accuracy(["<answer>\\frac{1}{2}</answer>", "<answer>374,660</answer>"], samples) == [1.0, 1.0]
