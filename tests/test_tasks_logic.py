"""Logic tasks: reasoning-gym puzzles with their difficulty options, deduplicated, graded by their scorers."""

import json

import pytest

from rewards import get_reward
from tasks import load_task
from tasks.logic import LOGIC_FAMILIES, register_family
from tasks.registry import task_names, task_rewards

# Small configurations keep the slow generators (zebra puzzles) fast.
QUICK = {"zebra_puzzles": {"num_people": 3, "num_characteristics": 3}}
# reasoning-gym's countdown scorer gives 0.01 to any answer that misses, but one outside the arithmetic grammar
# never reaches it and scores 0.
WRONG_SCORE = {"countdown": 0.0}


def verdicts(name, rows, answers):
    completions = [f"<think>\nsolving\n</think>\n<answer>{answer}</answer>" for answer in answers]
    return [get_reward(reward)(completions, rows) for reward in task_rewards(name)]


@pytest.mark.parametrize("family", LOGIC_FAMILIES)
def test_gold_answers_score_one_and_nonsense_zero(family):
    rows = load_task(family, "eval", 3, seed=7, **QUICK.get(family, {})).to_list()
    for row in rows:
        assert (row["question"], row["dataset"]) == (row["prompt"][-1]["content"], family)
        assert isinstance(json.loads(row["metadata"]), dict)
    for scores in verdicts(family, rows, [row["answer"] for row in rows]):
        assert scores == [1.0] * len(rows)
    for scores in verdicts(family, rows, ["no idea"] * len(rows)):
        assert scores == [WRONG_SCORE.get(family, 0.0)] * len(rows)


def test_options_reach_the_generator():
    countdown = load_task("countdown", "train", 4, min_numbers=3, max_numbers=3, min_target=10, max_target=50)
    for row in countdown:
        metadata = json.loads(row["metadata"])
        assert len(metadata["numbers"]) == 3 and 10 <= metadata["target"] <= 50
    knights = load_task("knights_knaves", "train", 4, n_people=3)
    assert all(len(json.loads(row["metadata"])["names"]) == 3 for row in knights)


def test_unknown_option_names_the_settable_ones():
    with pytest.raises(ValueError, match="n_people"):
        load_task("knights_knaves", "train", 2, people=3)


def test_a_small_puzzle_space_is_deduplicated_not_repeated():
    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ("+",),
            "allow_negation": False, "allow_parentheses": False}  # fmt: skip
    with pytest.raises(ValueError, match="distinct eval puzzles"):
        load_task("basic_arithmetic", "eval", 40, **tiny)


def test_a_family_scored_by_evaluating_symbolic_answers_is_refused():
    with pytest.raises(ValueError, match="^simple_integration: .*cannot be scored safely"):
        register_family("simple_integration")
    assert "simple_integration" not in task_names()
