"""Evaluation metrics over n sampled completions per problem: pass@k and maj@k, both unbiased.

Pure functions on plain lists so that every reported number can be checked by hand. Correctness
(``correct``) comes from the verifiers; extracted answers come from the task's answer parser.

Both estimate the score of a k-sample draw by averaging over every k-subset of the n samples (exactly, not by
drawing subsets), so pass@1 and maj@1 are both the fraction of correct samples, and neither depends on the
order the samples were generated in.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from fractions import Fraction


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k draws is correct) from n samples of which c are correct.

    Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``, computed as a product of ratios so that large n never
    overflows or cancels (the binomials themselves reach 1e100 at n=400).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[p]`` holds one flag per sample of problem p (n may vary)."""
    if not correct:
        raise ValueError("no problems to average over")
    return sum(pass_at_k(len(flags), sum(map(bool, flags)), k) for flags in correct) / len(correct)


def answer_groups(answers: Sequence[Hashable | None], correct: Sequence[bool]) -> list[tuple[int, int]]:
    """(samples, correct samples) per distinct answer. A sample whose answer could not be extracted (None) is an
    answer of its own: it agrees with no other sample, and still counts as the one draw it is."""
    groups: dict[Hashable, list[int]] = {}
    for i, (answer, ok) in enumerate(zip(answers, correct, strict=True)):
        group = groups.setdefault(("unextracted", i) if answer is None else ("answer", answer), [0, 0])
        group[0] += 1
        group[1] += bool(ok)
    return [(size, hits) for size, hits in groups.values()]


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """Unbiased maj@k: the expected correctness of the majority answer of k samples drawn without replacement
    from the n, averaged exactly over all C(n, k) subsets.

    ``answers[i]`` is the extracted (and normalised: equal answers must compare equal) answer of sample i and
    ``correct[i]`` its verdict. An answer's correctness is the share of its samples judged correct (1 or 0 when
    the verifier is consistent). Ties are split evenly: a subset where answers tie for the most votes scores the
    mean correctness of the tied answers (the expected score when the tie is broken uniformly at random).
    maj@1 is therefore the fraction of correct samples, pass@1.

    Computed by counting, for each vote count t of the winner, the subsets whose top answers have exactly t votes,
    one answer at a time (a dynamic programme over answers; integers, so the result is exact).
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= {n} samples, got k={k}")
    groups = answer_groups(answers, correct)
    scale = math.lcm(*(size for size, _ in groups))  # an answer's correctness hits / size, times scale, is whole
    # the winner's votes t: at least k spread over every answer, at most its own samples
    votes = range(-(-k // len(groups)), min(k, max(size for size, _ in groups)) + 1)
    expected = sum((_top_answers_worth(groups, k, t, scale) for t in votes), Fraction(0))
    return float(expected / (scale * math.comb(n, k)))


def _top_answers_worth(groups: list[tuple[int, int]], k: int, t: int, scale: int) -> Fraction:
    """Sum over the k-subsets whose most-voted answers have exactly t votes each, of the mean correctness (times
    ``scale``) of those tied answers.

    ``ways[z][s]`` counts the ways to pick z samples from the answers seen so far with every answer at most t
    votes and s of them at exactly t; ``worth[z][s]`` sums, over those ways, the scaled correctness of the s."""
    ties = k // t
    ways = [[0] * (ties + 1) for _ in range(k + 1)]
    worth = [[0] * (ties + 1) for _ in range(k + 1)]
    ways[0][0] = 1
    for size, hits in groups:
        value = hits * scale // size
        new_ways = [[0] * (ties + 1) for _ in range(k + 1)]
        new_worth = [[0] * (ties + 1) for _ in range(k + 1)]
        for z in range(k + 1):
            for s in range(ties + 1):
                if not ways[z][s]:
                    continue
                for x in range(min(size, t, k - z) + 1):
                    picks = math.comb(size, x)
                    at_top = int(x == t)
                    if at_top and s == ties:
                        continue
                    new_ways[z + x][s + at_top] += ways[z][s] * picks
                    new_worth[z + x][s + at_top] += (worth[z][s] + at_top * value * ways[z][s]) * picks
        ways, worth = new_ways, new_worth
    return sum((Fraction(worth[k][s], s) for s in range(1, ties + 1)), Fraction(0))
