"""Group-relative advantages against values worked out by hand in float64."""

import math

import pytest
import torch

from rlreason.advantages import STD_EPS, group_advantages


def test_group_mean_and_unbiased_std_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    # group 0: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3)
    s0 = math.sqrt(1 / 3)
    # group 1: mean 1.0, deviations 1, -1, 0, 0 -> unbiased std sqrt(2 / 3)
    s1 = math.sqrt(2 / 3)
    expected = torch.tensor(
        [
            [0.5 / (s0 + STD_EPS), -0.5 / (s0 + STD_EPS), -0.5 / (s0 + STD_EPS), 0.5 / (s0 + STD_EPS)],
            [1 / (s1 + STD_EPS), -1 / (s1 + STD_EPS), 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(group_advantages(rewards), expected, rtol=0, atol=1e-12)


def test_unscaled_is_centred_reward():
    rewards = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        group_advantages(rewards, scale=False), torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    )


def test_equal_rewards_give_zero_advantage_not_nan():
    advantages = group_advantages(torch.ones(3, 8))
    assert torch.equal(advantages, torch.zeros(3, 8))


def test_groups_are_independent():
    a = torch.tensor([[1.0, 0.0], [5.0, 7.0]])
    b = torch.tensor([[1.0, 0.0], [50.0, -7.0]])
    assert torch.equal(group_advantages(a)[0], group_advantages(b)[0])


@pytest.mark.parametrize("shape", [(8,), (4, 1)])
def test_rejects_shapes_without_a_group(shape):
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(shape))
