"""Format and shaping rewards."""

from __future__ import annotations

import time

import pytest

from rewards.format import (
    LENGTH_BUFFER,
    LENGTH_LIMIT,
    is_strict_r1,
    length_penalty,
    ngram_repetition_penalty,
    overlong_penalty,
    repetition_penalty,
    tag_count_format,
    think_format,
)


@pytest.mark.parametrize(
    ("text", "strict"),
    [
        ("<think>a</think><answer>b</answer>", True),
        ("\n<think>\na\n</think>\n<answer>\nb\n</answer>\n", True),
        ("<think></think><answer>b</answer>", False),  # empty think
        ("<think>a</think><answer> </answer>", False),  # empty answer
        ("<think>a</think><answer>b</answer> trailing", False),
        ("lead <think>a</think><answer>b</answer>", False),
        ("<think>a</think><think>a</think><answer>b</answer>", False),
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),
        ("<answer>b</answer><think>a</think>", False),
        ("<think>a<answer>b</answer></think>", False),
        ("", False),
    ],
)
def test_strict_r1(text, strict):
    assert is_strict_r1(text) is strict
    assert think_format([text], [{}]) == [float(strict)]


def test_tag_count_format():
    texts = [
        "<think>a</think><answer>b</answer>",
        "a</think><answer>b</answer>",
        "<answer>1</answer><answer>2</answer>",
        "",
    ]
    assert tag_count_format(texts, [{}] * 4) == [1.0, 0.75, 0.0, 0.0]


def test_length_penalty_is_soft_then_saturates():
    start = LENGTH_LIMIT - LENGTH_BUFFER
    texts = ["x" * start, "x" * (start + LENGTH_BUFFER // 2), "x" * LENGTH_LIMIT, "x" * (10 * LENGTH_LIMIT)]
    assert length_penalty(texts, [{}] * 4) == [0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(10, 5)(["x" * 7], [{}]) == [-0.4]


def test_repetition_penalty():
    varied = "the quick brown fox jumps over the lazy dog"
    loop = "I am stuck " * 100
    scores = repetition_penalty([varied, loop, "too short", ""], [{}] * 4)
    assert scores[0] == 0.0 and scores[1] < -0.95 and scores[2:] == [0.0, 0.0]
    assert ngram_repetition_penalty(1, -0.5)(["a a b b"], [{}]) == [-0.25]


def test_a_megabyte_costs_milliseconds():
    text = "word " * 200_000 + "<think>"
    started = time.monotonic()
    for fn in (think_format, tag_count_format, length_penalty, repetition_penalty):
        fn([text], [{}])
    assert time.monotonic() - started < 1.0
