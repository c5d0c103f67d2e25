"""pass@k, maj@k and best-of-n against values worked out by hand."""

from fractions import Fraction
from math import comb

import pytest

from rlreason.passk import best_of_n, maj_at_k, majority_index, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (4, 1, 3, 1 - 1 / 4),  # 1 - C(3,3)/C(4,3)
        (5, 2, 4, 1.0),  # only 3 wrong samples: any 4 contain a correct one
        (10, 0, 3, 0.0),
        (3, 3, 3, 1.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_are_huge():
    exact = 1 - Fraction(comb(1997, 1000), comb(2000, 1000))  # both binomials exceed 1e600
    assert exact == 1 - Fraction(1000 * 999 * 998, 2000 * 1999 * 1998)
    assert pass_at_k(2000, 3, 1000) == pytest.approx(float(exact), rel=1e-12)


def test_mean_pass_at_k_averages_problems():
    correct = [[True, False, False, False], [False] * 4, [True, True, False, False]]
    # 1 - C(3,2)/C(4,2) = 1/2;  0;  1 - C(2,2)/C(4,2) = 5/6
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 / 2 + 0 + 5 / 6) / 3)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_ties_go_to_the_first_answer_in_sample_order():
    assert majority_index(["b", "a", "a", "b"]) == 0
    assert majority_index([None, "a", "b", "b"]) == 2
    assert majority_index([None, None]) is None


def test_maj_at_k_by_hand():
    answers = ["3", "4", "3", None, "4"]
    correct = [True, False, True, False, False]
    assert maj_at_k(answers, correct, 5) == 1.0  # "3" and "4" twice each: "3" came first
    assert maj_at_k(answers, correct, 2) == 1.0  # one vote each: "3" came first
    assert maj_at_k(["5", "4", "4"], [True, False, False], 3) == 0.0  # "4" outvotes the right "5"
    assert maj_at_k(["5", "4", "4"], [True, False, False], 1) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0  # nothing extracted: no vote, wrong


def test_maj_at_k_checks_its_inputs():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)


def test_best_of_n_keeps_the_highest_score_and_the_earliest_tie():
    assert best_of_n([0.2, None, 0.9, 0.9]) == 2
    assert best_of_n([None, 0.0]) == 1
    with pytest.raises(ValueError):
        best_of_n([None, None])
