"""The final-answer policy of rewards.extract, rule by rule."""

from __future__ import annotations

import pytest

from rewards.extract import answer_block, boxed_contents, final_answer, is_hedged, visible_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think>\n<answer> 42 </answer>", "42"),
        ("reasoning only in the completion</think><answer>42</answer>", "42"),  # template opened <think>
        ("<think>a</think><answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("so the final answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$"),
        ("Final Answer: 7", "7"),
        ("<answer>The answer is 12 apples</answer>", "12 apples"),
        ("We add 3 and 4.\nThat gives 7.\n\nHope this helps!", "7"),
        ("x = -3.5.", "-3.5"),
        ("a total of 1,234 items", "1234"),
        ("ratio 3/4", "3/4"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{\\boxed{5}}", "\\boxed{5}"),
        ("\\fbox{5}", "5"),
        ("\\boxed{5} and again \\boxed{ 5 }", "5"),
        ("Final Answer: The final answer is $28 \\%$. I hope it is correct. Note: it was 27 once.", "$28 \\%$"),
        ("The answer is \\(7\\), since 3 + 4 = 7.", "\\(7\\)"),
        ("the answer is 3. Then the answer is 4.", "4"),
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<think>the answer is 42",  # never stopped thinking
        "<think>the answer is 42</think>",  # answer only inside think
        "<think>a</think><answer>1</answer><answer>2</answer>",  # several answer blocks
        "<think>a</think><answer>42",  # unclosed answer block
        "\\boxed{1} \\boxed{2}",  # different boxes
        "\\boxed{1} then \\boxed{2",  # a box left open falls back to nothing, not to the earlier box
        "9**9**9**9",  # numbers glued to operators are not standalone
        "2^10",
        "٦٨",  # Arabic-Indic digits
        "６８",  # fullwidth digits
        "it is 3 or 4",  # hedge on the fallback line
        "<answer>   </answer>",
    ],
)
def test_no_final_answer(text):
    assert final_answer(text) is None


def test_visible_text():
    assert visible_text("<think>a</think>b</think>c") == "c"
    assert visible_text("plain") == "plain"
    assert visible_text("<think>open") is None


def test_answer_block_needs_exactly_one_visible_block():
    assert answer_block("<think><answer>1</answer></think><answer> 2 </answer>") == "2"
    assert answer_block("no tags 3") is None
    assert answer_block("<answer>1</answer><answer>2</answer>") is None


def test_boxed_contents_is_linear_and_rejects_unclosed():
    assert boxed_contents("\\boxed{a{b}c} \\boxed{d}") == ["a{b}c", "d"]
    assert boxed_contents("\\boxed{" * 100_000) is None
    assert boxed_contents("}}} \\boxed{x}") == ["x"]


def test_is_hedged():
    assert is_hedged("3 or 4") and is_hedged("x=1 \\lor x=2") and is_hedged("A OR B")
    assert not is_hedged("order 66") and not is_hedged("\\frac{1}{2}")
