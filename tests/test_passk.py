"""pass@k and maj@k against values worked out by hand."""

from collections import Counter
from fractions import Fraction
from itertools import combinations
from math import comb

import pytest

from rlreason.observe.passk import maj_at_k, mean_pass_at_k, pass_at_k


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


def brute_force_maj_at_k(answers, correct, k):
    """Every k-subset, the majority of its extracted answers, ties split evenly (the definition, enumerated)."""
    keys = [("none", i) if a is None else a for i, a in enumerate(answers)]
    value = {key: Fraction(sum(c for kk, c in zip(keys, correct, strict=True) if kk == key), keys.count(key)) for key in keys}
    total = Fraction(0)
    for subset in combinations(range(len(keys)), k):
        votes = Counter(keys[i] for i in subset)
        top = max(votes.values())
        tied = [key for key, count in votes.items() if count == top]
        total += sum(value[key] for key in tied) / len(tied)
    return total / comb(len(keys), k)


def test_maj_at_k_by_hand():
    answers = ["3", "4", "3", None, "4"]
    correct = [True, False, True, False, False]
    # k=2, 10 pairs: {3,3} 1 -> 1; {4,4} 1 -> 0; {3,4} 4 ties -> 1/2 each; {3,None} 2 ties -> 1/2; {4,None} 2 -> 0
    assert maj_at_k(answers, correct, 2) == pytest.approx((1 + 4 / 2 + 2 / 2) / 10, abs=1e-15)
    # k=3, 10 triples: {3,3,x} 3 -> 1; {4,4,x} 3 -> 0; one 3, one 4, None: 4 three-way ties -> 1/3 each
    assert maj_at_k(answers, correct, 3) == pytest.approx((3 + 4 / 3) / 10, abs=1e-15)
    assert maj_at_k(answers, correct, 5) == 0.5  # "3" and "4" twice each: a tie, split evenly
    assert maj_at_k(["5", "4", "4"], [True, False, False], 3) == 0.0  # "4" outvotes the right "5"
    # k=2 of ["5","4","4"]: {5,4} twice, ties -> 1/2; {4,4} -> 0
    assert maj_at_k(["5", "4", "4"], [True, False, False], 2) == pytest.approx(1 / 3, abs=1e-15)
    assert maj_at_k([None, None], [False, False], 2) == 0.0  # nothing extracted: no agreement, both wrong


@pytest.mark.parametrize(
    ("answers", "correct"),
    [
        (["3", "4", "3", None, "4"], [True, False, True, False, False]),
        (["1", "1", "2", "3", "3", "3", None, "1"], [True, True, False, False, False, False, True, True]),
        ([None] * 4 + ["7"] * 3, [False, True, False, False, True, True, True]),
        (["a", "a", "b"], [True, False, True]),  # an inconsistent verifier: "a" is right half of the time
    ],
)
def test_maj_at_k_is_the_average_over_every_subset_and_maj_at_1_is_pass_at_1(answers, correct):
    for k in range(1, len(answers) + 1):
        assert maj_at_k(answers, correct, k) == pytest.approx(float(brute_force_maj_at_k(answers, correct, k)), abs=1e-15)
    assert maj_at_k(answers, correct, 1) == pytest.approx(pass_at_k(len(correct), sum(correct), 1), abs=1e-15)


def test_maj_at_k_does_not_depend_on_sample_order():
    answers, correct = ["5", "4", "4", "5", "6"], [True, False, False, True, False]
    assert maj_at_k(answers, correct, 3) == maj_at_k(answers[::-1], correct[::-1], 3)


def test_maj_at_k_checks_its_inputs():
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)
