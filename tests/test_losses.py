"""The clipped surrogate, k3 KL and GRPO aggregation against float64 values worked out by hand."""

import math

import torch

from rlreason.losses import clipped_surrogate, grpo_token_weights, kl_k3, masked_mean

f64 = torch.float64


def test_clipped_surrogate_by_hand():
    # two sequences, two tokens each; epsilon 0.2
    old = torch.zeros(2, 2, dtype=f64)
    logp = torch.tensor([[math.log(1.5), math.log(0.9)], [math.log(0.5), math.log(1.1)]], dtype=f64)
    adv = torch.tensor([2.0, -1.0], dtype=f64)
    loss, stats = clipped_surrogate(logp, old, adv, epsilon=0.2)
    # seq 0 (A=2): ratio 1.5 -> min(3.0, 1.2*2=2.4) = 2.4; ratio 0.9 -> min(1.8, 1.8) = 1.8
    # seq 1 (A=-1): ratio 0.5 -> min(-0.5, -0.8) = -0.8; ratio 1.1 -> min(-1.1, -1.1) = -1.1
    expected = -torch.tensor([[2.4, 1.8], [-0.8, -1.1]], dtype=f64)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    assert stats["clipped"].tolist() == [[True, False], [True, False]]


def test_ratio_one_never_clips_and_gradient_is_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=f64, requires_grad=True)
    adv = torch.tensor([0.7], dtype=f64)
    loss, stats = clipped_surrogate(logp, logp.detach(), adv, epsilon=0.2)
    assert torch.all(stats["ratio"] == 1) and not stats["clipped"].any()
    loss.sum().backward()
    # d/dlogp of -ratio * A at ratio 1 is -A
    torch.testing.assert_close(logp.grad, torch.full((1, 3), -0.7, dtype=f64))


def test_k3_kl_by_hand_and_nonnegative():
    logp = torch.tensor([math.log(0.5), math.log(0.2)], dtype=f64)
    ref = torch.tensor([math.log(0.25), math.log(0.2)], dtype=f64)
    # d = log(0.25/0.5) = -log 2: exp(d) - d - 1 = 0.5 + log 2 - 1
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0], dtype=f64))
    assert (kl_k3(torch.randn(100, dtype=f64), torch.randn(100, dtype=f64)) >= 0).all()


def test_beta_adds_weighted_kl():
    logp = torch.tensor([[math.log(0.5)]], dtype=f64)
    ref = torch.tensor([[math.log(0.25)]], dtype=f64)
    base, _ = clipped_surrogate(logp, logp, torch.tensor([1.0], dtype=f64), 0.2)
    with_kl, stats = clipped_surrogate(
        logp, logp, torch.tensor([1.0], dtype=f64), 0.2, beta=0.1, ref_logprobs=ref
    )
    torch.testing.assert_close(with_kl - base, 0.1 * stats["kl"])


def test_grpo_weights_average_tokens_then_sequences():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=f64)
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]], dtype=f64)
    # sequence means 2 and 4 -> batch mean 3; padding never counts
    assert (per_token * grpo_token_weights(mask)).sum().item() == 3.0


def test_grpo_weights_split_over_micro_batches_equal_whole_batch():
    mask = (torch.rand(6, 5) > 0.3).to(f64)
    mask[:, 0] = 1
    values = torch.randn(6, 5, dtype=f64)
    weights = grpo_token_weights(mask)
    whole = (values * weights).sum()
    split = (values[:3] * weights[:3]).sum() + (values[3:] * weights[3:]).sum()
    torch.testing.assert_close(whole, split)


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0
    assert masked_mean(torch.tensor([5.0]), torch.tensor([0.0])).item() == 0.0
