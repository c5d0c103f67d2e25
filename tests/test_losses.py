"""Policy objectives against float64 values and gradients worked out by hand.

The gradient tests use two sequences of unequal length (1 and 3 tokens, plus padding) and check the
per-token gradients each paper describes for its aggregation and its importance ratio.
"""

import math

import pytest
import torch

from rlreason.objective.losses import (
    clipped_surrogate,
    grpo_token_weights,
    high_entropy_mask,
    importance_log_ratio,
    kl_divergence,
    kl_k3,
    masked_mean,
    policy_loss,
    token_weights,
)

f64 = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=f64)


# ----------------------------------------------------------------- clipping


def test_clipped_surrogate_by_hand():
    ratio = t([[1.5, 0.9], [0.5, 1.1]])
    adv = t([2.0, -1.0])
    loss, stats = clipped_surrogate(ratio, adv, epsilon_low=0.2)
    # seq 0 (A=2): ratio 1.5 -> min(3.0, 1.2*2=2.4) = 2.4; ratio 0.9 -> min(1.8, 1.8) = 1.8
    # seq 1 (A=-1): ratio 0.5 -> min(-0.5, -0.8) = -0.8; ratio 1.1 -> min(-1.1, -1.1) = -1.1
    torch.testing.assert_close(loss, -t([[2.4, 1.8], [-0.8, -1.1]]), rtol=0, atol=1e-12)
    assert stats["clipped"].tolist() == [[True, False], [True, False]]
    assert stats["clipped_high"].tolist() == [[True, False], [False, False]]
    assert stats["clipped_low"].tolist() == [[False, False], [True, False]]
    assert "clipped_dual" not in stats


def test_clip_higher_raises_only_the_upper_bound():  # DAPO
    ratio = t([[1.25, 1.3], [0.7, 0.75]])
    adv = t([2.0, -1.0])
    symmetric, _ = clipped_surrogate(ratio, adv, 0.2)
    higher, stats = clipped_surrogate(ratio, adv, 0.2, epsilon_high=0.28)
    # A=2: 1.25 is clipped to 1.2 by eps 0.2 but not by eps_high 0.28; 1.3 is clipped to 1.28
    torch.testing.assert_close(symmetric[0], -t([2.4, 2.4]), rtol=0, atol=1e-12)
    torch.testing.assert_close(higher[0], -t([2.5, 2.56]), rtol=0, atol=1e-12)
    # A=-1: the low side is the same 0.8 in both: min(-0.7, -0.8) = -0.8, min(-0.75, -0.8) = -0.8
    torch.testing.assert_close(higher[1], t([0.8, 0.8]), rtol=0, atol=1e-12)
    torch.testing.assert_close(symmetric[1], higher[1], rtol=0, atol=0)
    assert stats["clipped_high"].tolist() == [[False, True], [False, False]]
    assert stats["clipped_low"].tolist() == [[False, False], [True, True]]


def test_dual_clip_caps_negative_advantage_loss_by_hand():  # Ye et al. 2020
    ratio = t([[5.0, 2.0], [5.0, 1.0]]).requires_grad_()
    adv = t([-1.0, 1.0])
    loss, stats = clipped_surrogate(ratio, adv, 0.2, dual_clip=3.0)
    # A=-1: plain PPO loss is |A| * ratio = 5 and 2; dual clip caps it at c |A| = 3
    # A=+1: ratio 5 is clipped high to 1.2 (dual clip is for A < 0 only); ratio 1 -> -1
    torch.testing.assert_close(loss, t([[3.0, 2.0], [-1.2, -1.0]]), rtol=0, atol=1e-12)
    assert stats["clipped_dual"].tolist() == [[True, False], [False, False]]
    assert stats["clipped"].tolist() == [[True, False], [True, False]]
    loss.sum().backward()
    # d loss / d ratio: 0 where a clip is active, -A elsewhere
    torch.testing.assert_close(ratio.grad, t([[0.0, 1.0], [0.0, -1.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ratio_one_never_clips_and_gradient_is_advantage(level):
    logp = t([[-1.0, -2.0, -0.5]]).requires_grad_()
    mask = t([[1.0, 1.0, 1.0]])
    loss, stats = policy_loss(
        logp, logp.detach(), t([0.7]), mask, importance_sampling=level, epsilon_low=1e-9, epsilon_high=1e-9, dual_clip=1.0 + 1e-9
    )
    assert torch.all(stats["ratio"] == 1) and not stats["clipped"].any()
    loss.sum().backward()
    # d/dlogp of -ratio * A at ratio 1 is -A per token; at sequence level each of the 3 tokens' losses -s A moves
    # by -A / 3 per token, and summed over the 3 tokens that is -A again
    torch.testing.assert_close(logp.grad, torch.full((1, 3), -0.7, dtype=f64))


def test_sequence_log_ratio_is_the_masked_token_mean():  # GSPO
    logp, old = t([[0.2, 0.4, 7.0], [-0.3, 5.0, 5.0]]), torch.zeros(2, 3, dtype=f64)
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    expected = t([[0.3, 0.3, 0.3], [-0.3, -0.3, -0.3]])
    torch.testing.assert_close(importance_log_ratio(logp, old, mask, "sequence"), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(importance_log_ratio(logp, old, mask, "token"), logp, rtol=0, atol=0)


# ----------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5), math.log(0.2)]), t([math.log(0.25), math.log(0.2)])
    # log r = log(0.25 / 0.5) = -log 2, r = 0.5
    log2 = math.log(2)
    torch.testing.assert_close(kl_divergence(logp, ref, "k1"), t([log2, 0.0]))
    torch.testing.assert_close(kl_divergence(logp, ref, "k2"), t([log2**2 / 2, 0.0]))
    torch.testing.assert_close(kl_divergence(logp, ref, "k3"), t([0.5 - 1 + log2, 0.0]))
    torch.testing.assert_close(kl_k3(logp, ref), kl_divergence(logp, ref, "k3"))
    x, y = torch.randn(100, dtype=f64), torch.randn(100, dtype=f64)
    assert (kl_divergence(x, y, "k2") >= 0).all() and (kl_divergence(x, y, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_divergence(x, y, "k4")


def test_kl_estimators_expectations_and_gradients_on_a_categorical():
    """Exact expectations over a 3-outcome policy q against a reference p (Schulman 2020; Tang & Munos 2025):
    E_q[k1] = E_q[k3] = KL(q||p); as losses, E_q[grad k1] = 0, E_q[grad k2] = grad KL(q||p), E_q[grad k3] = grad KL(p||q)."""
    theta = t([0.3, -0.2, 0.5]).requires_grad_()
    ref = torch.log_softmax(t([0.0, 0.4, -0.3]), dim=0)

    def expected_grad(estimator):
        logq = torch.log_softmax(theta, dim=0)
        weights = logq.exp().detach()  # sampling weights: no gradient through the sampling distribution
        (grad,) = torch.autograd.grad((weights * kl_divergence(logq, ref, estimator)).sum(), theta)
        return grad

    logq = torch.log_softmax(theta, dim=0)
    q, p = logq.exp(), ref.exp()
    kl_qp = (q * (logq - ref)).sum()
    kl_pq = (p * (ref - logq)).sum()
    for estimator in ("k1", "k3"):
        torch.testing.assert_close((q * kl_divergence(logq, ref, estimator)).sum(), kl_qp)
    (grad_qp,) = torch.autograd.grad(kl_qp, theta, retain_graph=True)
    (grad_pq,) = torch.autograd.grad(kl_pq, theta)
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(3, dtype=f64), rtol=0, atol=1e-15)
    torch.testing.assert_close(expected_grad("k2"), grad_qp)
    torch.testing.assert_close(expected_grad("k3"), grad_pq)


def test_policy_loss_adds_beta_kl_and_subtracts_entropy_bonus():
    logp, ref = t([[math.log(0.5), math.log(0.2)]]), t([[math.log(0.25), math.log(0.2)]])
    mask, adv, entropy = t([[1.0, 1.0]]), t([1.0]), t([[1.5, 0.5]])
    base, _ = policy_loss(logp, logp, adv, mask)
    torch.testing.assert_close(base, t([[-1.0, -1.0]]))
    for estimator in ("k1", "k2", "k3"):
        with_kl, stats = policy_loss(logp, logp, adv, mask, beta=0.1, ref_logprobs=ref, kl_estimator=estimator)
        torch.testing.assert_close(with_kl - base, 0.1 * kl_divergence(logp, ref, estimator))
        torch.testing.assert_close(stats["kl"], kl_divergence(logp, ref, estimator))
    with_bonus, _ = policy_loss(logp, logp, adv, mask, entropy=entropy, entropy_coef=0.01)
    torch.testing.assert_close(with_bonus - base, t([[-0.015, -0.005]]))
    with pytest.raises(ValueError, match="reference"):
        policy_loss(logp, logp, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp, adv, mask, entropy_coef=0.01)


# ----------------------------------------------------------------- aggregation

MASK = t([[1, 0, 0, 0], [1, 1, 1, 0]])  # sequence lengths 1 and 3, padded to 4
VALUES = t([[4.0, 100.0, 100.0, 100.0], [1.0, 2.0, 3.0, 100.0]])


def test_token_weights_by_hand():
    # grpo: sequence means 4 and 2, then their mean 3
    assert (VALUES * token_weights(MASK, "grpo")).sum().item() == pytest.approx(3.0, abs=1e-15)
    assert torch.equal(grpo_token_weights(MASK), token_weights(MASK, "grpo"))
    # bnpo / dapo: (4 + 1 + 2 + 3) / 4 tokens
    for loss_type in ("bnpo", "dapo"):
        assert (VALUES * token_weights(MASK, loss_type)).sum().item() == pytest.approx(2.5, abs=1e-15)
    # dr_grpo: (4 + 1 + 2 + 3) / (2 sequences * max_len 5)
    assert (VALUES * token_weights(MASK, "dr_grpo", max_len=5)).sum().item() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match="max_len"):
        token_weights(MASK, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        token_weights(MASK, "mean")


def test_fully_masked_sequences_leave_the_mean():
    # e.g. a truncated completion under overlong=mask: grpo averages over the remaining sequence only
    mask = t([[0, 0, 0, 0], [1, 1, 1, 0]])
    assert (VALUES * token_weights(mask, "grpo")).sum().item() == pytest.approx(2.0, abs=1e-15)
    assert (VALUES * token_weights(mask, "dapo")).sum().item() == pytest.approx(2.0, abs=1e-15)
    assert (VALUES * token_weights(mask, "dr_grpo", max_len=3)).sum().item() == pytest.approx(1.0, abs=1e-15)  # 2 x 3


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_weights_split_over_micro_batches_equal_whole_batch(loss_type):
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.3).to(f64)
    mask[:, 0] = 1
    values = torch.randn(6, 5, dtype=f64)
    weights = token_weights(mask, loss_type, max_len=5) * high_entropy_mask(torch.rand(6, 5, dtype=f64), mask, 0.5)
    whole = (values * weights).sum()
    split = (values[:3] * weights[:3]).sum() + (values[3:] * weights[3:]).sum()
    torch.testing.assert_close(whole, split)


def _grad(logp, old, adv, loss_type, level="token"):
    logp = logp.clone().requires_grad_()
    per_token, _ = policy_loss(logp, old, adv, MASK, importance_sampling=level, epsilon_low=0.2)
    (per_token * token_weights(MASK, loss_type, max_len=4)).sum().backward()
    return logp.grad


def test_aggregation_gradients_on_two_sequences_of_unequal_length():
    """At ratio 1 the gradient on token t of sequence i is -A_i * w_it:
    GRPO: -A_i / (N |y_i|): a short sequence's tokens move more, and a long wrong answer is punished less per token
    (the length bias Dr. GRPO describes); every sequence gets the same total, |A_i| / N.
    DAPO (token mean over the batch): -A_i / sum|y|: every token the same, a sequence's total grows with its length.
    Dr. GRPO: -A_i / (N * max_len): DAPO's direction with a constant that does not depend on the batch's lengths."""
    logp = t([[-1.0, 0.0, 0.0, 0.0], [-0.5, -2.0, -1.0, 0.0]])
    adv = t([1.0, -1.0])  # the short sequence is right, the long one wrong
    grpo = _grad(logp, logp, adv, "grpo")
    torch.testing.assert_close(grpo, t([[-1 / 2, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]]), rtol=0, atol=1e-15)
    for loss_type in ("bnpo", "dapo"):
        torch.testing.assert_close(_grad(logp, logp, adv, loss_type), t([[-1 / 4, 0, 0, 0], [1 / 4, 1 / 4, 1 / 4, 0]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(_grad(logp, logp, adv, "dr_grpo"), t([[-1 / 8, 0, 0, 0], [1 / 8, 1 / 8, 1 / 8, 0]]), rtol=0, atol=1e-15)
    # per-sequence totals: GRPO equal (1/2 each), DAPO proportional to length (1/4 vs 3/4)
    assert grpo.abs().sum(dim=1).tolist() == pytest.approx([0.5, 0.5])


def test_token_vs_sequence_importance_ratio_gradients():
    """Off-policy (ratios != 1), GRPO aggregation, epsilon 0.2, N = 2:
    token level: d/dlogp_it = -A_i r_it / (N |y_i|), 0 on tokens whose own ratio is clipped;
    sequence level (GSPO): s_i = exp(mean_t log r_it) and d/dlogp_it = -A_i s_i / (N |y_i|) on every token,
    the whole sequence clipped or not."""
    old = torch.zeros(2, 4, dtype=f64)
    adv = t([-1.0, 1.0])
    # sequence 0: one token, log-ratio -0.1 (inside the clip range); sequence 1: log-ratios 0.1, -0.1, 0.3
    logp = t([[-0.1, 0.0, 0.0, 0.0], [0.1, -0.1, 0.3, 0.0]])
    e = math.exp
    token = _grad(logp, old, adv, "grpo", "token")
    # ratio e^0.3 = 1.35 > 1.2 with A > 0: that token alone is clipped
    torch.testing.assert_close(token, t([[e(-0.1) / 2, 0, 0, 0], [-e(0.1) / 6, -e(-0.1) / 6, 0, 0]]), rtol=0, atol=1e-15)
    sequence = _grad(logp, old, adv, "grpo", "sequence")
    # s_1 = exp(0.3 / 3) = e^0.1 = 1.105, inside the range: every token of sequence 1 gets -e^0.1 / 6
    torch.testing.assert_close(sequence, t([[e(-0.1) / 2, 0, 0, 0], [-e(0.1) / 6] * 3 + [0]]), rtol=0, atol=1e-15)
    # log-ratios 0.3, 0.3, 0: s_1 = e^0.2 = 1.22 > 1.2 clips the whole sequence, even its token with ratio 1
    logp = t([[-0.1, 0.0, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0]])
    sequence = _grad(logp, old, adv, "grpo", "sequence")
    torch.testing.assert_close(sequence[1], torch.zeros(4, dtype=f64), rtol=0, atol=0)
    token = _grad(logp, old, adv, "grpo", "token")
    torch.testing.assert_close(token[1], t([0, 0, -1 / 6, 0]), rtol=0, atol=1e-15)


# ----------------------------------------------------------------- entropy


def test_high_entropy_mask_keeps_the_top_quantile_of_real_tokens():
    entropy = t([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 7.0, 7.0]])  # 7.0 sits on padding and must not count
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    # 5 real tokens, top 40% = the two highest: 0.9 and 0.8 (threshold: 0.6 quantile = 0.62)
    assert high_entropy_mask(entropy, mask, 0.4).tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask)
    assert high_entropy_mask(entropy, mask, 1e-6).sum().item() == 1  # only the highest


def test_masked_mean():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0])).item() == 2.0
    assert masked_mean(torch.tensor([5.0]), torch.tensor([0.0])).item() == 0.0


# ----------------------------------------------------------------- the top-entropy mask and the entropy bonus


def test_policy_mask_keeps_the_kl_on_every_token_by_hand():
    """top_entropy_quantile < 1 with beta > 0: the mask drops the surrogate of the unselected token, its KL stays
    (as in TRL). Ratio 1, A = 0.5, beta = 0.1, k3 with log r = ref - logprob = (-0.5, 1.0, -0.5):
    kl = (e^-0.5 + 0.5 - 1, e - 2, e^-0.5 + 0.5 - 1) = (0.1065306597126334, 0.7182818284590451, 0.1065306597126334);
    per token: selected -0.5 + 0.1 kl, unselected 0.1 kl only."""
    logprobs = t([[-1.0, -2.0, -0.5]]).requires_grad_()
    ref = t([[-1.5, -1.0, -1.0]])
    per_token, stats = policy_loss(
        logprobs, logprobs.detach(), t([0.5]), torch.ones(1, 3, dtype=f64), beta=0.1, ref_logprobs=ref,
        policy_mask=t([[1.0, 0.0, 1.0]]),
    )
    expected = t([[-0.5 + 0.01065306597126334, 0.07182818284590451, -0.5 + 0.01065306597126334]])
    torch.testing.assert_close(per_token, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["kl"], t([[0.1065306597126334, 0.7182818284590451, 0.1065306597126334]]), rtol=0, atol=1e-12)
    # d/dlogprob: surrogate -A (selected tokens only) + beta * dk3/dlogprob = beta * (1 - e^{log r})
    per_token.sum().backward()
    grad = [-0.5 + 0.1 * (1 - math.exp(-0.5)), 0.1 * (1 - math.e), -0.5 + 0.1 * (1 - math.exp(-0.5))]
    torch.testing.assert_close(logprobs.grad, t([grad]), rtol=0, atol=1e-12)


def test_entropy_bonus_is_aggregated_with_the_loss_types_weights_by_hand():
    """Two sequences of 1 and 3 tokens with entropies (2) and (1, 3, 5), A = 0 so only the bonus is left,
    entropy_coef = 0.1. grpo weights 1/2 and 1/6: -0.1 (2/2 + 9/6) = -0.25; dapo weights 1/4: -0.1 * 11/4 = -0.275
    (TRL's token mean, whatever the loss type, would be -0.275 for both)."""
    mask = t([[1, 0, 0], [1, 1, 1]])
    entropy = t([[2.0, 0.0, 0.0], [1.0, 3.0, 5.0]])
    logprobs = t([[-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    per_token, _ = policy_loss(logprobs, logprobs, t([0.0, 0.0]), mask, entropy=entropy, entropy_coef=0.1)
    for loss_type, expected in (("grpo", -0.25), ("dapo", -0.275)):
        assert float((per_token * token_weights(mask, loss_type)).sum()) == pytest.approx(expected, abs=1e-12)


def test_policy_mask_keeps_the_entropy_bonus_on_the_selected_tokens_only():
    logprobs = t([[-1.0, -1.0]])
    per_token, _ = policy_loss(
        logprobs, logprobs, t([0.0]), torch.ones(1, 2, dtype=f64), entropy=t([[2.0, 4.0]]), entropy_coef=0.5,
        policy_mask=t([[0.0, 1.0]]),
    )
    torch.testing.assert_close(per_token, t([[0.0, -2.0]]), rtol=0, atol=1e-12)
