"""The Objective alone, on hand-made tensors: what a step needs, reward shaping, token weights, loss inputs."""

import pytest
import torch

from rlreason.config import load_config
from rlreason.objective.objective import FrozenPass, Objective, TokenMean

f64 = torch.float64


def test_built_from_train_and_rollout_settings():
    config = load_config(None, ["train.loss_type=dr_grpo", "train.beta=0.1", "rollout.max_new_tokens=32"])
    objective = Objective.from_config(config)
    assert (objective.loss_type, objective.beta, objective.max_len) == ("dr_grpo", 0.1, 32)


@pytest.mark.parametrize(
    ("options", "old", "entropy", "reference", "kl_in_loss"),
    [
        ({}, False, False, False, False),
        ({"num_iterations": 2}, True, False, False, False),
        ({"beta": 0.1}, False, False, True, True),
        ({"beta": 0.1, "kl_in_reward": True}, True, False, True, False),
        ({"top_entropy_quantile": 0.2}, True, True, False, False),
    ],
)
def test_what_a_step_needs(options, old, entropy, reference, kl_in_loss):
    objective = Objective(**options)
    assert objective.needs_old_logprobs == old and objective.needs_entropy == entropy
    assert objective.needs_reference == reference and objective.kl_in_loss == kl_in_loss


def test_loss_reads_old_logprobs_only_when_the_ratio_can_move_and_the_reference_only_for_a_kl_term():
    frozen = FrozenPass(old=torch.zeros(1, 2), entropy=torch.ones(1, 2), ref=torch.ones(1, 2))
    assert Objective().loss_inputs(frozen) == FrozenPass()
    both = Objective(num_iterations=2, beta=0.1).loss_inputs(frozen)
    assert both.old is frozen.old and both.ref is frozen.ref and both.entropy is None
    assert Objective(beta=0.1, kl_in_reward=True).loss_inputs(frozen).ref is None


def test_soft_overlong_and_kl_in_the_reward_by_hand():
    """max_len 4, buffer 2: lengths 2, 3, 4 get penalties 0, -0.5, -1. k1 KL of 0.5 per token, beta 0.2: a
    completion of n tokens loses 0.2 * 0.5 n."""
    objective = Objective(max_len=4, overlong="soft", overlong_buffer=2, beta=0.2, kl_in_reward=True, kl_estimator="k1")
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    frozen = FrozenPass(old=torch.zeros(3, 4, dtype=f64), ref=torch.full((3, 4), -0.5, dtype=f64))
    shaped, stats = objective.shape_rewards(torch.ones(1, 3, dtype=f64), mask, frozen)
    torch.testing.assert_close(shaped, torch.tensor([[1 - 0.2, 1 - 0.5 - 0.3, 1 - 1 - 0.4]], dtype=f64), rtol=0, atol=1e-12)
    assert stats["overlong/penalized"] == 2 and stats["overlong/penalty"] == pytest.approx(-0.5)
    assert stats["kl"] == TokenMean(4.5, 9.0)


def test_weights_mask_truncated_completions_and_select_high_entropy_tokens():
    objective = Objective(loss_type="dapo", overlong="mask", top_entropy_quantile=0.5)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    truncated = torch.tensor([False, True])
    entropy = torch.tensor([[0.1, 0.9, 0.2, 0.8], [5.0, 5.0, 0.0, 0.0]])
    weights = objective.weigh(mask, truncated, entropy)
    torch.testing.assert_close(weights.weights, torch.tensor([[0.25] * 4, [0.0] * 4]))
    assert weights.policy.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    assert weights.trained.tolist() == [[False, True, False, True], [False] * 4]
    metrics = objective.batch_metrics(weights, mask, truncated)
    assert metrics == {"trained_token_fraction": TokenMean(2.0, 6.0), "overlong/masked": 1}
    assert Objective().batch_metrics(Objective().weigh(mask, truncated, None), mask, truncated) == {}


def test_reference_refresh_steps():
    assert [s for s in range(1, 7) if Objective(beta=0.1, ref_update_every=3).refreshes_reference(s)] == [3, 6]
    assert not any(Objective(beta=0.1).refreshes_reference(s) for s in range(1, 7))
