"""Every built-in reward is registered, callable by name and by path, and the example works as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rewards import get_reward, reward_names

BUILT_IN = [
    "code_tests",
    "code_tests_all",
    "exact_match",
    "length_penalty",
    "logic_accuracy",
    "math_accuracy",
    "repetition_penalty",
    "shown_work",
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


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'math_accuracy'"):
        get_reward("math_acuracy")


def test_a_reward_module_in_the_working_directory_resolves_through_the_console_script(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def fires(completions, samples):\n    return [1.0 for _ in completions]\n")
    config = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    script = Path(sys.executable).parent / "rlreason"
    rewards = 'rewards=[{name: "my_rewards:fires", weight: 1.0}, {name: "my_rewards:missing", weight: 1.0}]'
    # group_size=1 makes the config check fail before any model loads, after every reward was resolved.
    checked = subprocess.run([str(script), "train", str(config), "rollout.group_size=1", rewards],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2
    assert "rollout.group_size" in checked.stderr + checked.stdout
    assert "rewards[0]" not in checked.stderr + checked.stdout
    assert "rewards[1].name: reward 'my_rewards:missing': module 'my_rewards' has no function 'missing'" in checked.stderr


def test_the_shown_work_example_tells_worked_answers_from_bare_ones():
    from rewards.example import shown_work
    from tasks import load_task

    row = load_task("arithmetic", "train", 1, seed=0)[0]
    a, b = (int(x) for x in row["prompt"][-1]["content"].removeprefix("What is ").rstrip("?").split(" + "))
    answer = row["answer"]
    completions = [
        row["solution"],  # the task's own worked trace
        f"<think>\n{a} + {b} = {answer}\n</think>\n<answer>{answer}</answer>",
        f"<think>\nI just know it.\n</think>\n<answer>{answer}</answer>",
        f"<think>\n{a}+{b}={int(answer) + 1}\n</think>\n<answer>{int(answer) + 1}</answer>",  # false equation
        f"<think>\n{a}+{b}={answer}\n</think>\n<answer>{int(answer) + 10}</answer>",  # work not used
        f"{a}+{b}={answer} <answer>{answer}</answer>",  # no thinking block
    ]
    assert shown_work(completions, [row] * len(completions)) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert shown_work(["x"], [{"tests": ["assert True"]}]) == [None]
    assert get_reward("rewards.example:shown_work") is get_reward("shown_work") is shown_work
