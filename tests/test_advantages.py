"""Advantage estimators and reward shaping against values worked out by hand in float64."""

import math

import pytest
import torch

from rlreason.objective.advantages import (
    STD_EPS,
    compute_advantages,
    group_advantages,
    kl_penalised_rewards,
    overlong_penalty,
    rloo_advantages,
    zero_variance_groups,
)

f64 = torch.float64
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]], dtype=f64)
CENTRED = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]], dtype=f64)  # group means 0.5 and 1.0


def test_group_mean_and_unbiased_std_by_hand():
    # group 0: unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3); group 1: deviations 1, -1, 0, 0 -> sqrt(2/3)
    stds = torch.tensor([[math.sqrt(1 / 3)], [math.sqrt(2 / 3)]], dtype=f64)
    expected = CENTRED / (stds + STD_EPS)
    torch.testing.assert_close(group_advantages(REWARDS), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(group_advantages(REWARDS, "group"), expected, rtol=0, atol=1e-12)


def test_batch_std_scaling_by_hand():
    # all 8 rewards: mean 0.75, squared deviations sum to 3.5, unbiased variance 3.5 / 7 = 0.5
    expected = CENTRED / (math.sqrt(0.5) + STD_EPS)
    torch.testing.assert_close(group_advantages(REWARDS, "batch"), expected, rtol=0, atol=1e-12)


def test_unscaled_is_centred_reward():  # Dr. GRPO
    torch.testing.assert_close(group_advantages(REWARDS, "none"), CENTRED, rtol=0, atol=0)
    rewards = torch.tensor([[3.0, 1.0, 2.0]], dtype=f64)
    torch.testing.assert_close(group_advantages(rewards, "none"), torch.tensor([[1.0, -1.0, 0.0]], dtype=f64))


def test_rloo_leaves_one_out_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0]], dtype=f64)
    # baselines: mean of the other two = (1+2)/2, (3+2)/2, (3+1)/2 = 1.5, 2.5, 2.0
    expected = torch.tensor([[1.5, -1.5, 0.0]], dtype=f64)
    torch.testing.assert_close(rloo_advantages(rewards), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(compute_advantages(rewards, "rloo", "none"), expected, rtol=0, atol=1e-12)
    # the group's unbiased std is 1, so group scaling divides by 1 + eps
    torch.testing.assert_close(rloo_advantages(rewards, "group"), expected / (1 + STD_EPS), rtol=0, atol=1e-12)
    # in general: G / (G - 1) times the group-mean advantage
    torch.testing.assert_close(rloo_advantages(REWARDS), CENTRED * 4 / 3, rtol=0, atol=1e-12)


@pytest.mark.parametrize("estimator", ["group", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero_advantage_not_nan(estimator, scale):
    assert torch.equal(compute_advantages(torch.ones(3, 8), estimator, scale), torch.zeros(3, 8))


@pytest.mark.parametrize("estimator", ["group", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantage_where_their_mean_rounds(estimator, scale):
    """1 + 0.2 (a right answer in format): float32's mean of eight of them is off by 1.2e-7."""
    rewards = torch.tensor([[1.2] * 8, [0.2, 1.2, 0.2, 0.2, 1.2, 0.2, 0.2, 0.2]])
    assert float(rewards[0].mean()) != float(rewards[0, 0])
    advantages = compute_advantages(rewards, estimator, scale)
    assert torch.equal(advantages[0], torch.zeros(8)) and advantages[1].abs().min() > 0.1


@pytest.mark.parametrize("estimator", ["group", "rloo"])
def test_groups_are_independent_under_group_scaling(estimator):
    a = torch.tensor([[1.0, 0.0], [5.0, 7.0]])
    b = torch.tensor([[1.0, 0.0], [50.0, -7.0]])
    assert torch.equal(compute_advantages(a, estimator, "group")[0], compute_advantages(b, estimator, "group")[0])


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(REWARDS, "ppo")
    with pytest.raises(ValueError, match="scale"):
        compute_advantages(REWARDS, "group", "std")


@pytest.mark.parametrize("shape", [(8,), (4, 1)])
def test_rejects_shapes_without_a_group(shape):
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(shape))
    with pytest.raises(ValueError, match="G >= 2"):
        rloo_advantages(torch.zeros(shape))


def test_zero_variance_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.0, 1e-9]], dtype=f64)
    assert zero_variance_groups(rewards).tolist() == [True, False, True, False]


def test_soft_overlong_penalty_by_hand():
    # DAPO: max 10 tokens, buffer 4 -> no penalty up to 6 tokens, then -1/4 per token, -1 at 10 (and beyond)
    lengths = torch.tensor([3.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0], dtype=f64)
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0], dtype=f64)
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer=4), expected, rtol=0, atol=1e-12)


def test_kl_in_reward_subtracts_the_summed_kl_by_hand():
    rewards = torch.tensor([[1.0, 0.0]], dtype=f64)
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 9.0, 9.0]], dtype=f64)  # 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=f64)
    # sums 0.3 and 0.3, times beta 0.5
    expected = torch.tensor([[0.85, -0.15]], dtype=f64)
    torch.testing.assert_close(kl_penalised_rewards(rewards, kl, mask, beta=0.5), expected, rtol=0, atol=1e-12)
