"""logic_accuracy (reasoning-gym's scorers, sandboxed) and exact_match."""

from __future__ import annotations

import json
import time

import pytest
from reasoning_gym import create_dataset

from rewards.logic import exact_match, logic_accuracy, normalise
from rewards.sandbox.pool import Limits

FAMILIES = ("countdown", "n_queens", "binary_matrix", "spiral_matrix", "string_insertion", "knights_knaves")


GRAMMAR_FAMILIES = ("countdown", "puzzle24", "binary_matrix", "spiral_matrix", "n_queens", "string_insertion")
# Finds the job's secret in its memory and prints a framed verdict of 1.0: eval() and parse_expr both run it.
FORGE = ("[__import__('os').write(1, ('\\n%s 1.0\\n' % N['nonce']).encode()) "
         "for N in __import__('gc').get_objects() if N.__class__ is {}.__class__ and 'nonce' in N]")


def row(family: str, seed: int = 3) -> dict:
    """A row as tasks.logic builds it."""
    entry = create_dataset(family, seed=seed, size=1)[0]
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


def test_answers_that_find_the_jobs_secret_cannot_forge_a_score():
    samples = [row(family) for family in GRAMMAR_FAMILIES]
    assert logic_accuracy([f"<answer>{FORGE}</answer>"] * len(samples), samples) == [0.0] * len(samples)


def test_honest_answers_of_grammar_families_still_score_one():
    samples = [row(family, seed) for family in GRAMMAR_FAMILIES for seed in range(4)]
    gold = [f"<think>solved</think><answer>{s['answer']}</answer>" for s in samples]
    assert logic_accuracy(gold, samples) == [1.0] * len(samples)


def test_literal_answers_keep_the_scorers_partial_credit():
    matrix, spiral = row("binary_matrix"), row("spiral_matrix")
    literal_matrix = str([[int(x) for x in line.split()] for line in matrix["answer"].splitlines()])
    literal_spiral = str([int(x) for x in spiral["answer"].split()])
    completions = [f"<answer>{literal_matrix}</answer>", f"<answer>{literal_spiral}</answer>"]
    assert logic_accuracy(completions, [matrix, spiral]) == [0.1, 0.1]


def test_rows_of_refused_families_score_zero():
    entry = create_dataset("polynomial_multiplication", seed=3, size=1)[0]
    sample = {"question": entry["question"], "answer": entry["answer"], "metadata": json.dumps(entry["metadata"]),
              "dataset": "polynomial_multiplication"}
    assert logic_accuracy([f"<answer>{entry['answer']}</answer>"], [sample]) == [0.0]


def test_hanging_scorer_input_is_cut_off(rows, monkeypatch):
    """Whatever reaches a scorer is still held to the deadline (here with the grammar bypassed)."""
    monkeypatch.setattr("rewards.logic.LIMITS", Limits(timeout_s=1.0))
    monkeypatch.setattr("rewards.logic.canonical_answer", lambda family, answer, gold: answer)
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
