"""Reasoning statistics on hand-made completions, with every expected number worked out by hand."""

import math

import pytest

from rlreason.config import ConfigError, RunConfig, load_config
from rlreason.observe.reasoning import (
    Milestones,
    answer_changes,
    candidate_answers,
    first_crossings,
    length_stats,
    phrase_pattern,
    reasoning_stats,
    split_think,
    task_accuracy,
)

PHRASES = RunConfig().reflection_phrases
REVISED = "<think>17+25=32. So the answer is 32. Wait, 7+5=12, carry 1. So 17+25=42.</think><answer>42</answer>"


def test_phrases_match_whole_words_in_any_case_and_spacing():
    pattern = phrase_pattern(PHRASES)
    text = "Wait, let me  re-check. It awaits. Hmm, VERIFY: double-check; waiting"
    assert [m.lower() for m in pattern.findall(text)] == ["wait", "let me  re-check", "hmm", "verify", "double-check"]
    assert phrase_pattern(["", "  "]) is None


def test_split_think_handles_missing_and_unclosed_blocks():
    assert split_think(REVISED) == ("17+25=32. So the answer is 32. Wait, 7+5=12, carry 1. So 17+25=42.", "<answer>42</answer>")
    assert split_think("just 42") == ("", "just 42")
    assert split_think("<think>still thinking") == ("still thinking", "")


def test_answer_changes_count_revised_results_inside_the_think_block():
    assert candidate_answers(split_think(REVISED)[0]) == ["32", "42"]
    assert answer_changes(REVISED) == 1
    boxed = r"<think>\boxed{5}. Hmm. Therefore it is 1,000. The answer: 1000</think>5"
    assert candidate_answers(split_think(boxed)[0]) == ["5", "1000", "1000"]
    assert answer_changes(boxed) == 1
    assert answer_changes("So the answer is 32. So it is 42.") == 0  # no think block: nothing was revised


def test_reasoning_stats_by_hand():
    texts = [REVISED, "Wait. 42"]
    by_chars = lambda parts: [len(p) for p in parts]  # noqa: E731
    stats = reasoning_stats(texts, [90, 10], PHRASES, by_chars)
    assert stats["reasoning/reflections_per_1k"] == pytest.approx(1000 * 2 / 100)  # one "Wait" in each
    assert stats["reasoning/format_adherence"] == 0.5  # only the first is <think>..</think><answer>..</answer>
    assert stats["reasoning/answer_changes"] == 0.5
    assert stats["think_length"] == pytest.approx((len(split_think(REVISED)[0]) + 0) / 2)
    # the second has no tags: its answer is the whole completion, whose count (10) is given, not re-counted (8)
    assert stats["answer_length"] == pytest.approx((len("<answer>42</answer>") + 10) / 2)
    assert reasoning_stats([], [], PHRASES, by_chars) == {}


def test_length_stats_and_task_accuracy():
    stats = length_stats([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], [False] * 9 + [True])
    assert stats == {"completion_length": 55.0, "completion_length_p90": 91.0, "completion_length_max": 100.0, "truncated_fraction": 0.1}
    accuracy = task_accuracy(["math", "code", "math", "logic", None], [1.0, 0.0, 0.0, math.nan, 1.0])
    assert accuracy == {"accuracy/code": 0.0, "accuracy/math": 0.5}  # logic never applied: left out


def test_milestones_report_the_first_crossing_once():
    rows = [{"step": 1, "accuracy": 0.2}, {"step": 2, "accuracy": 0.6}, {"step": 3, "accuracy": 0.9}]
    assert first_crossings(rows, {"accuracy": 0.5, "kl": 1.0}) == {"accuracy": 2, "kl": None}
    watch = Milestones({"accuracy": 0.5})
    assert watch.update(rows[0]) == []
    assert watch.update(rows[1]) == ["accuracy reached 0.5 at step 2 (0.6)"]
    assert watch.update(rows[2]) == []
    resumed = Milestones({"accuracy": 0.5}, history=rows[:2])
    assert resumed.update(rows[2]) == [] and resumed.reached == {"accuracy": 2}


def test_config_keys_for_reasoning_statistics():
    config = load_config(None, ["run.reflection_phrases=[wait, hold on]", "run.milestones={accuracy: 1}"])
    assert config.run.reflection_phrases == ["wait", "hold on"] and config.run.milestones == {"accuracy": 1}
    with pytest.raises(ConfigError, match=r"run\.milestones\.accuracy: the threshold must be a number, got 'high'"):
        load_config(None, ["run.milestones={accuracy: high}"])
