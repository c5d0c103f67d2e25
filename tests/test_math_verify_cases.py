"""math_accuracy against math-verify's own test cases (tests/data/math_verify_cases.json says where they come from).

Each prediction is laid out as an R1 completion: a thinking block, then the prediction as the answer block (a
prediction with its own ``</think>`` is the completion itself). Where math_accuracy differs from math-verify's
expectation on purpose, DELIBERATE names the policy; every other case must agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewards.math import math_accuracy

CASES = json.loads((Path(__file__).parent / "data" / "math_verify_cases.json").read_text())["cases"]

HEDGE = "several distinct boxes are a hedge: no answer, even when together they list the gold's parts"
DELIBERATE = {
    "test_all.py::test_number_extraction[5]": "a comma is never a decimal point (1,234 is 1234)",
    "test_all.py::test_number_extraction[6]": "a comma is never a decimal point (1,234 is 1234)",
    "test_all.py::test_latex_notation[5]": "plain numbers are read too (math-verify's test turns them off)",
    "test_all.py::test_latex_notation[6]": "plain numbers are read too (math-verify's test turns them off)",
    "test_all.py::test_latex_notation_math[4]": "a box is read as written: \\boxed{12 $ and $13 } is no formula",
    "test_all.py::test_math_extraction_edge_cases[2]": "a final answer over 1000 characters scores 0 (here the "
                                                       "whole answer block, which has no box and no answer phrase)",
    "test_all.py::test_math_extraction_additional_cases[17]": HEDGE,
    "test_all.py::test_math_extraction_additional_cases[28]": HEDGE,
    "test_numina_cases.py::test_numina_cases[12]": HEDGE,
    **{f"test_open_thoughts.py::test_open_thoughts[{i}]": HEDGE for i in (12, 13, 14, 16, 18, 19, 23, 24, 25)},
}


def completion(pred: str) -> str:
    if "</think>" in pred:
        return pred if "<think>" in pred else f"<think>{pred}"
    return f"<think>Working it out.</think>\n<answer>{pred}</answer>"


@pytest.fixture(scope="module")
def scores() -> dict[str, float]:
    results = math_accuracy([completion(c["pred"]) for c in CASES], [{"answer": c["gold"]} for c in CASES])
    return {case["id"]: score for case, score in zip(CASES, results, strict=True)}


def test_the_fixture_is_what_the_test_expects():
    assert len(CASES) == 258 and {c["expected"] for c in CASES} == {0, 1}
    assert set(DELIBERATE) <= {c["id"] for c in CASES}


def test_agrees_with_math_verify_except_where_a_policy_says_otherwise(scores):
    disagree = {c["id"] for c in CASES if scores[c["id"]] != c["expected"]}
    assert disagree == set(DELIBERATE)
