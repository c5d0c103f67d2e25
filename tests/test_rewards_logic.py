"""logic_accuracy (reasoning-gym's scorers, sandboxed) and exact_match."""

from __future__ import annotations

import json
import time

import pytest
from reasoning_gym import create_dataset

from rewards.logic import exact_match, logic_accuracy, normalise
from rewards.sandbox import Limits

FAMILIES = ("countdown", "n_queens", "binary_matrix", "spiral_matrix", "string_insertion", "knights_knaves")


def row(family: str) -> dict:
    """A row as tasks.logic builds it."""
    entry = create_dataset(family, seed=3, size=1)[0]
    return {
        "question": entry["question"],
        "answer": entry["answer"],
        "metadata": json.dumps(entry["metadata"]),
        "dataset": family,
        "task": family,
    }


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {family: row(family) for family in FAMILIES}


def test_gold_answers_score_one_and_junk_scores_low(rows):
    samples = list(rows.values())
    gold = [f"<think>solved</think><answer>{s['answer']}</answer>" for s in samples]
    junk = ["<think>hmm</think><answer>no idea</answer>"] * len(samples)
    scores = logic_accuracy(gold + junk, samples + samples)
    assert scores[: len(samples)] == [1.0] * len(samples)
    assert all(s < 0.1 for s in scores[len(samples) :])


def test_answers_that_scorers_eval_run_in_the_sandbox(rows, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}') or [[1]]"
    samples = [
        rows[f] for f in ("binary_matrix", "n_queens", "spiral_matrix", "string_insertion", "countdown")
    ]
    scores = logic_accuracy([f"<answer>{payload}</answer>"] * len(samples), samples)
    assert all(s < 0.1 for s in scores)
    assert not marker.exists()


def test_hanging_scorer_input_is_cut_off(rows, monkeypatch):
    monkeypatch.setattr("rewards.logic.LIMITS", Limits(timeout_s=1.0))
    logic_accuracy(["<answer>1</answer>"] * 2, [rows["countdown"]] * 2)  # both zygotes started before timing
    started = time.monotonic()
    assert logic_accuracy(["<answer>9**9**9**9</answer>"], [rows["countdown"]]) == [0.0]
    assert time.monotonic() - started < 4.0


def test_answer_policy_applies(rows):
    sample = rows["knights_knaves"]
    hidden = f"<think><answer>{sample['answer']}</answer></think>"
    doubled = f"<answer>{sample['answer']}</answer><answer>{sample['answer']}</answer>"
    assert logic_accuracy([hidden, doubled, ""], [sample] * 3) == [0.0, 0.0, 0.0]


def test_applicability(rows):
    samples = [{"answer": "7"}, {"tests": ["assert True"]}, rows["countdown"]]
    assert logic_accuracy(["<answer>7</answer>"] * 3, samples)[:2] == [None, None]
    assert exact_match(["<answer>7</answer>"] * 3, samples) == [1.0, None, None]


@pytest.mark.parametrize(
    ("answer", "gold"),
    [("Paris", "paris"), ("  New   York. ", "new york"), ("$\\text{yes}$", "Yes"), ('"blue"', "blue")],
)
def test_exact_match_normalisation(answer, gold):
    assert normalise(answer) == normalise(gold)
    assert exact_match([f"<answer>{answer}</answer>"], [{"answer": gold}]) == [1.0]


def test_exact_match_rejects_hedges_and_near_misses():
    assert exact_match(
        ["<answer>Paris or Lyon</answer>", "<answer>Pariss</answer>"], [{"answer": "Paris"}] * 2
    ) == [0.0, 0.0]
