"""Every registered task: local data only, required fields, disjoint splits, rewards that exist; and mixing."""

from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, concatenate_datasets

from rewards import get_reward
from tasks import load_task, task_names
from tasks.mix import align, apportion, mix_tasks
from tasks.prompts import R1_SYSTEM_PROMPT, render, render_plain
from tasks.registry import get_task_builder, task_rewards
from tasks.sources import problem_key

FIXTURES = Path(__file__).parent / "fixtures"

# (options, train size, eval size) per task; DEFAULT for the rest. Finite tasks read local fixtures (never the
# hub) and are loaded whole, so their disjointness check is complete.
SETTINGS = {
    "gsm8k": ({"source": str(FIXTURES / "gsm8k")}, 5, 3),
    "math": ({"source": str(FIXTURES / "math")}, 5, 3),
    "mbpp": ({"source": str(FIXTURES / "mbpp")}, 3, 3),
    "humaneval": ({}, 74, 90),
    "zebra_puzzles": (
        {"num_people": 3, "num_characteristics": 3},
        12,
        3,
    ),  # default size takes 75 ms a puzzle
}
DEFAULT = ({}, 12, 3)
EXPECTED = {
    "arithmetic", "basic_arithmetic", "gsm_symbolic", "gsm8k", "math",
    "humaneval", "mbpp",
    "countdown", "knights_knaves", "zebra_puzzles", "mini_sudoku", "syllogism", "circuit_logic", "family_relationships",
}  # fmt: skip


# Tasks of this package; other test modules register toy tasks of their own.
ADAPTERS = {"verifiers"}
"""Tasks whose rows come from an environment a user names (tests/test_verifiers_env.py covers their splits)."""
BUILTIN = [name for name in task_names() if get_task_builder(name).__module__.startswith("tasks.") and name not in ADAPTERS]


HIDDEN_STATE = {"guess_number"}
"""Games whose rows all ask the same question: the problem is the secret a row hides, its answer."""


def questions(dataset: Dataset) -> list[str]:
    return [
        problem_key(row["prompt"][-1]["content"]) + (f" [{row['answer']}]" if row["task"] in HIDDEN_STATE else "")
        for row in dataset
    ]


def test_every_expected_task_is_registered():
    assert set(BUILTIN) >= EXPECTED


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_are_disjoint_and_rows_complete(name):
    options, train_size, eval_size = SETTINGS.get(name, DEFAULT)
    train = load_task(name, "train", train_size, seed=0, **options)
    held_out = load_task(name, "eval", eval_size, seed=0, **options)
    assert (len(train), len(held_out)) == (train_size, eval_size)
    for dataset in (train, held_out):
        assert set(dataset["task"]) == {name}
        for row in dataset:
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
            assert row["prompt"][0]["content"] == R1_SYSTEM_PROMPT
        assert len(set(questions(dataset))) == len(dataset), "a problem repeats within a split"
    assert not set(questions(train)) & set(questions(held_out))


@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_names_rewards_that_exist(name):
    assert task_rewards(name), f"{name} names no reward to verify it"
    for reward in task_rewards(name):
        get_reward(reward)


def test_same_seed_same_rows_other_seed_other_order():
    first = load_task("arithmetic", "train", 8, seed=1)
    assert first.to_list() == load_task("arithmetic", "train", 8, seed=1).to_list()
    assert first["answer"] != load_task("arithmetic", "train", 8, seed=2)["answer"]


def test_unknown_split_and_task_are_clear_errors():
    with pytest.raises(ValueError, match="split"):
        load_task("arithmetic", "test", 2)
    with pytest.raises(KeyError, match="did you mean 'countdown'"):
        load_task("countdwn", "train", 2)


@pytest.mark.parametrize(
    ("size", "weights", "counts"),
    [(10, [1, 1, 1], [4, 3, 3]), (5, [2, 1], [3, 2]), (7, [0.5, 0.25, 0.25], [3, 2, 2]), (0, [1, 3], [0, 0])],
)
def test_apportion_by_largest_remainder(size, weights, counts):
    assert apportion(size, weights) == counts


def test_apportion_rejects_bad_weights():
    with pytest.raises(ValueError):
        apportion(3, [1, 0])


OWN_FIELDS = {
    "arithmetic": {"answer", "solution"},
    "countdown": {"question", "answer", "dataset", "metadata"},
    "mbpp": {"tests"},
    "humaneval": {"tests"},
}
MIX = [
    ("arithmetic", 1.0, {"digits": 3}),
    ("countdown", 1.0, {"min_numbers": 3, "max_numbers": 3}),
    ("mbpp", 1.0, {"source": str(FIXTURES / "mbpp")}),
    ("humaneval", 1.0, {}),
]


def test_mixed_tasks_concatenate_and_rewards_dispatch_by_task():
    mixed = mix_tasks(MIX, "train", 8, seed=0)
    assert Counter(mixed["task"]) == {"arithmetic": 2, "countdown": 2, "mbpp": 2, "humaneval": 2}
    rows = mixed.to_list()
    for row in rows:
        assert {field for field, value in row.items() if value is not None} == {
            "prompt",
            "task",
        } | OWN_FIELDS[row["task"]]
    completions = ["<think>x</think>\n<answer>1</answer>"] * len(rows)
    for task_name in OWN_FIELDS:
        for reward in task_rewards(task_name):
            scores = get_reward(reward)(completions, rows)
            for row, value in zip(rows, scores, strict=True):
                assert (value is None) == (reward not in task_rewards(row["task"])), (reward, row["task"])
    held_out = mix_tasks(MIX, "eval", 4, seed=0)
    assert len(concatenate_datasets([mixed, held_out])) == 12
    assert not set(questions(mixed)) & set(questions(held_out))


def test_align_refuses_a_column_with_two_types():
    with pytest.raises(ValueError, match="'answer'"):
        align([Dataset.from_list([{"answer": "1"}]), Dataset.from_list([{"answer": 1}])])


class _TemplatedTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return f"templated {len(messages)} {tokenize} {add_generation_prompt}"


class _BaseTokenizer:
    chat_template = None


def test_render_uses_the_chat_template_or_plain_text():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render(_TemplatedTokenizer(), messages) == "templated 2 False True"
    assert render(_BaseTokenizer(), messages) == render_plain(messages) == "System: S\nUser: Q\nAssistant:"
