"""Every built-in reward is registered, callable by name and by path, and the example works as documented."""

from __future__ import annotations

import pytest

from rewards import get_reward, reward_names

BUILT_IN = [
    "code_tests",
    "code_tests_all",
    "concise_answer",
    "exact_match",
    "length_penalty",
    "logic_accuracy",
    "math_accuracy",
    "repetition_penalty",
    "tag_count_format",
    "think_format",
]


def test_built_in_names():
    assert set(BUILT_IN) <= set(reward_names())


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_reward_returns_one_score_per_completion(name):
    completions = ["<think>t</think><answer>4</answer>", ""]
    samples = [{"answer": "4", "task": "arithmetic"}, {"answer": "4", "task": "arithmetic"}]
    scores = get_reward(name)(completions, samples)
    assert len(scores) == 2 and all(s is None or isinstance(s, float) for s in scores)


def test_example_reward_by_name_and_by_path():
    completions = [
        "<answer>Paris</answer>",
        "<answer>it is the city of Paris in France</answer>",
        "<answer>x</answer>",
    ]
    samples = [{"answer": "Paris"}, {"answer": "Paris"}, {"tests": ["assert True"]}]
    assert get_reward("concise_answer")(completions, samples) == [1.0, 0.0, None]
    assert get_reward("rewards.example:concise_answer") is get_reward("concise_answer")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'math_accuracy'"):
        get_reward("math_acuracy")
