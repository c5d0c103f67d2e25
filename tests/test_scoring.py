"""Combining rewards: weights, None, and verifiers that raise, return garbage or hang."""

import time
from types import SimpleNamespace

import numpy as np

from rewards.code import code_tests_all
from rewards.format import think_format
from rewards.sandbox.pool import SandboxError
from rlreason.scoring import WeightedReward, resolve_rewards, score

COMPLETIONS = ["a", "bb", "ccc"]
SAMPLES = [{"task": "x"}, {"task": "y"}, {"task": "x"}]


def length(completions, samples):
    return [float(len(c)) for c in completions]


def only_x(completions, samples):
    return [1.0 if s["task"] == "x" else None for s in samples]


def test_weighted_total_skips_none():
    scores = score(COMPLETIONS, SAMPLES, [WeightedReward("len", 0.5, length), WeightedReward("x", 2.0, only_x)])
    assert scores.total.tolist() == [0.5 + 2.0, 1.0, 1.5 + 2.0]
    assert np.isnan(scores.columns[1, 1])
    assert scores.means() == {"len": 2.0, "x": 1.0}
    assert scores.failures == {}


def test_raising_wrong_length_and_nonfinite_rewards_score_zero_and_are_counted():
    def boom(completions, samples):
        raise RuntimeError("verifier bug")

    def short(completions, samples):
        return [1.0]

    def infinite(completions, samples):
        return [float("inf"), 1.0, float("nan")]

    rewards = [WeightedReward("boom", 1.0, boom), WeightedReward("short", 1.0, short), WeightedReward("inf", 1.0, infinite)]
    scores = score(COMPLETIONS, SAMPLES, rewards)
    assert scores.failures == {"boom": 3, "short": 3, "inf": 1}
    assert scores.errors == {"boom": "RuntimeError: verifier bug", "short": "ValueError: returned 1 scores for 3 completions"}
    assert scores.columns[:, :2].tolist() == [[0.0, 0.0]] * 3
    assert scores.columns[0, 2] == 0.0 and scores.columns[1, 2] == 1.0
    assert np.isnan(scores.columns[2, 2])  # NaN is how None is stored: "does not apply"


def test_hanging_reward_times_out_and_the_next_call_still_works():
    def hang(completions, samples):
        time.sleep(30)
        return [1.0] * len(completions)

    start = time.perf_counter()
    scores = score(COMPLETIONS, SAMPLES, [WeightedReward("hang", 1.0, hang), WeightedReward("len", 1.0, length)], timeout=0.5)
    assert time.perf_counter() - start < 5
    assert scores.failures == {"hang": 3} and scores.total.tolist() == [1.0, 2.0, 3.0]
    assert score(COMPLETIONS, SAMPLES, [WeightedReward("len", 1.0, length)], timeout=0.5).total.tolist() == [1.0, 2.0, 3.0]


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero_score():
    def no_sandbox(completions, samples):
        raise SandboxError("sandbox could not start: namespaces unavailable")

    scores = score(COMPLETIONS, SAMPLES, [WeightedReward("code", 1.0, no_sandbox), WeightedReward("len", 1.0, length)])
    assert scores.errors == {"code": "SandboxError: sandbox could not start: namespaces unavailable"}
    assert scores.failures == {"code": 3}


def test_a_module_path_reward_is_named_by_its_registered_name():
    specs = [SimpleNamespace(name="rewards.format:think_format", weight=0.2), SimpleNamespace(name="tests.test_scoring:length", weight=1.0)]
    resolved = resolve_rewards(specs)
    assert [r.name for r in resolved] == ["think_format", "tests.test_scoring:length"]
    assert resolved[0].fn is think_format


def test_hanging_code_completions_cost_only_their_own_scores():
    honest = "<answer>\n```python\ndef f(x):\n    return 2 * x\n```\n</answer>"
    hanging = "<answer>\n```python\ndef f(x):\n    while True:\n        pass\n```\n</answer>"
    completions = [hanging, hanging, hanging, honest] * 8
    samples = [{"tests": ["assert f(2) == 4"]}] * len(completions)
    start = time.perf_counter()
    scores = score(completions, samples, [WeightedReward("code", 1.0, code_tests_all)], timeout=4.0)
    assert time.perf_counter() - start < 4.0 + 2.0
    assert scores.failures == {} and scores.errors == {}
    assert scores.total.tolist() == [0.0, 0.0, 0.0, 1.0] * 8


def test_concatenated_scores_keep_every_calls_failures_and_errors_once():
    from rlreason.scoring import Scores, concat_scores

    first = Scores(["r"], np.array([[1.0], [0.0], [1.0]]), np.array([1.0, 0.0, 1.0]), {"r": 1}, {"r": "SandboxError: a"})
    second = Scores(["r"], np.array([[0.5], [0.25]]), np.array([0.5, 0.25]), {"r": 2}, {"r": "SandboxError: b"})
    dropped = Scores(["r"], np.array([[0.0]]), np.array([0.0]), {"r": 4})
    merged = concat_scores([(first, [2, 0]), (second, slice(None)), (first, [1])], [first, second, dropped])
    assert merged.total.tolist() == [1.0, 1.0, 0.5, 0.25, 0.0]
    assert merged.columns[:, 0].tolist() == merged.total.tolist()
    assert merged.failures == {"r": 7}
    assert merged.errors == {"r": "SandboxError: a"}
