"""Evaluation metrics over n sampled completions per problem: pass@k, maj@k and best-of-n.

Pure functions on plain lists so that every reported number can be checked by hand. Correctness
(``correct``) and scores come from the verifiers; extracted answers come from the task's answer parser.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence


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


def majority_index(answers: Sequence[Hashable | None]) -> int | None:
    """Index of a sample carrying the most frequent answer; None answers (nothing extracted) never vote.

    Ties go to the answer that appears first in sample order, and the index returned is that answer's first
    occurrence: the result depends only on the order of the samples, never on hashing or sorting of answers.
    Returns None when no sample produced an answer.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> float:
    """1.0 when the majority answer of the first k samples is correct, else 0.0.

    ``answers[i]`` is the extracted (and normalised: equal answers must compare equal) answer of sample i and
    ``correct[i]`` its verdict. Using the first k samples, not an average over all k-subsets of n, matches how
    maj@k / cons@k are usually reported: sample exactly k per problem.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)} samples, got k={k}")
    winner = majority_index(answers[:k])
    return float(winner is not None and bool(correct[winner]))


def best_of_n(scores: Sequence[float | None]) -> int:
    """Index of the completion to keep: the highest verifier score, the earliest on ties; None never wins."""
    scored = [(score, -i) for i, score in enumerate(scores) if score is not None]
    if not scored:
        raise ValueError("best_of_n needs at least one scored completion")
    return -max(scored)[1]
