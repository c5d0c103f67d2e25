"""Policy objectives: pure functions on per-token tensors [N, L] with a mask of real completion tokens.

The loss of a batch is ``sum(per_token_loss * token_weights)``. Splitting that sum over micro-batches gives the
same gradient as one big batch, and the choice of ``token_weights`` is the aggregation (``token_weights``).

``policy_loss`` composes the pieces, each a small function below:

- ``importance_log_ratio``: per token (GRPO/PPO) or one length-normalised ratio per sequence (GSPO).
- ``clipped_surrogate``: PPO's clip with separate low/high ranges (DAPO's clip-higher) and dual clip.
- ``kl_divergence``: the k1, k2, k3 estimators of KL(policy || reference) (Schulman 2020).
- entropy bonus, and ``high_entropy_mask`` to train only on the highest-entropy tokens.
- ``rollout_correction_weights``: importance weights of the policy term for the gap between the rollout engine's
  log-probs and the trainer's at the same weights (TIS, MIS).

Every term is aggregated by the same ``token_weights``, the entropy bonus too (as in veRL; TRL takes its token
mean): the bonus then keeps its strength relative to the surrogate whatever the loss type and the lengths.

Left out: value functions and GAE, per-token advantages (an advantage is per sequence, broadcast over its
tokens), soft reference updates (TR-DPO's mixing), and sequence-level variants of the KL term and of the rollout
correction (one weight per sequence: veRL's ``rollout_is: sequence``, sequence-level MIS).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("tis", "mis")


def importance_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """log(pi / pi_old) per token [N, L].

    ``token`` (GRPO, PPO): each token's own log-ratio. ``sequence`` (GSPO, Zheng et al. 2025): the sequence's
    length-normalised log-ratio (1/|y|) sum_t log(pi/pi_old), the same value on every token of the sequence, so
    the sequence is clipped (or not) as a whole.
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    if level == "sequence":
        per_sequence = (log_ratio * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return per_sequence.expand_as(log_ratio)
    raise ValueError(f"importance sampling level must be one of {IMPORTANCE_LEVELS}, got {level!r}")


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective per token, negated for minimisation: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    ``advantages`` is [N] (one per sequence, broadcast over its tokens); ``epsilon_high`` None means
    ``epsilon_low`` (DAPO raises it so that unlikely tokens can grow). ``dual_clip`` c > 1 (Ye et al. 2020) caps
    the loss of a negative-advantage token at c |A|, so a huge ratio cannot blow it up. The boolean stats say
    where a clip is active (the token has no gradient there): ``clipped_low`` (r < 1 - eps_low, A < 0),
    ``clipped_high`` (r > 1 + eps_high, A > 0), ``clipped_dual`` (r > c, A < 0), ``clipped`` (any of them).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon_low, 1 + eps_high) * adv
    loss = -torch.min(unclipped, clipped)
    stats = {"clipped_low": (ratio < 1 - epsilon_low) & (adv < 0), "clipped_high": (ratio > 1 + eps_high) & (adv > 0)}
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.min(loss, -dual_clip * adv), loss)  # <- dual clip: at most c |A|
        stats["clipped_dual"] = (ratio > dual_clip) & (adv < 0)
    stats["clipped"] = torch.stack(list(stats.values())).any(dim=0)
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_divergence(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on tokens sampled from the policy (Schulman 2020).

    With log r = log pi_ref - log pi:
      k1 = -log r            unbiased, can be negative; as a loss its expected gradient is 0 (use it in the reward)
      k2 = (log r)^2 / 2     biased but >= 0; as a loss its expected gradient is that of KL(pi || pi_ref)
      k3 = r - 1 - log r     unbiased and >= 0 (GRPO's choice); as a loss its expected gradient is that of
                             the other direction, KL(pi_ref || pi) (Tang & Munos 2025)
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return log_r**2 / 2
    if estimator == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator (``kl_divergence(..., "k3")``): exp(d) - d - 1 with d = ref - policy, >= 0."""
    return kl_divergence(logprobs, ref_logprobs, "k3")


def rollout_correction_weights(
    old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mode: str, cap: float = 2.0, low: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached per-token weights [N, L] of the policy term, and where their bound acted (bool [N, L]).

    The engine that sampled a token gives it a probability pi_engine that differs from the trainer's pi_old at the
    same weights (other kernels, bf16 rounding), so the batch is slightly off-policy for the trainer; the
    importance weight r = pi_old / pi_engine corrects that, bounded so that one token cannot dominate:

      tis  w = min(r, cap); acted where r > cap (truncated). Yao et al. 2025, "Your efficient RL framework
           secretly brings you off-policy RL training" (C = 2); veRL's ``rollout_is: token``.
      mis  w = r inside [low, cap], 0 outside (the token's policy term is dropped); acted outside (masked).
           Masked IS: Liu et al. 2025, "When speed kills stability"; IcePop (Ling Team 2025). ``low`` None:
           1 / cap, as veRL's ``rollout_rs_threshold_lower``.
    """
    ratio = torch.exp(old_logprobs.detach() - engine_logprobs.detach())
    if mode == "tis":
        return ratio.clamp(max=cap), ratio > cap
    if mode == "mis":
        outside = (ratio < (1 / cap if low is None else low)) | (ratio > cap)
        return torch.where(outside, torch.zeros_like(ratio), ratio), outside  # <- not r * 0: r may be inf there
    raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    importance_sampling: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    policy_mask: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss [N, L]: clipped surrogate + beta * KL to the reference - entropy_coef * entropy.

    ``mask`` [N, L] marks real completion tokens (only the sequence-level ratio reads it); aggregation is left to
    ``token_weights``. ``policy_mask`` (0/1, e.g. ``high_entropy_mask``) keeps the surrogate and the entropy bonus on
    its tokens only; the KL term stays on every token, as in TRL, because the reference constrains the whole
    completion (shared weights move the unselected tokens too). ``rollout_weights`` (``rollout_correction_weights``)
    multiply the surrogate only, as in veRL: they correct the policy gradient's estimate, and the KL and entropy
    terms are regularisers. Returns the loss and detached per-token stats: ratio, clip flags, and kl when beta > 0.
    """
    ratio = torch.exp(importance_log_ratio(logprobs, old_logprobs, mask, importance_sampling))
    loss, stats = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high, dual_clip)
    stats["ratio"] = ratio.detach()
    if rollout_weights is not None:
        loss = loss * rollout_weights
    if policy_mask is not None:
        loss = loss * policy_mask
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probabilities")
        kl = kl_divergence(logprobs, ref_logprobs, kl_estimator)
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the per-token entropy (with its gradient)")
        bonus = entropy if policy_mask is None else entropy * policy_mask
        loss = loss - entropy_coef * bonus  # <- entropy bonus: maximise entropy, so subtract it from the loss
    return loss, stats


def token_weights(mask: torch.Tensor, loss_type: str = "grpo", max_len: int | None = None) -> torch.Tensor:
    """Per-token weights w with ``sum(loss * w)`` = the batch loss; computed once per batch, so micro-batches add up.

    grpo       (DeepSeekMath) mean over each sequence's tokens, then over sequences: w = 1 / (N |y_i|). A token of
               a short completion weighs more than one of a long completion.
    bnpo, dapo (DAPO)         mean over all tokens of the batch: w = 1 / sum_i |y_i|. Every token weighs the same.
               (TRL's ``bnpo`` normalises per micro-batch; here both use the whole batch, so they are one option.)
    dr_grpo    (Dr. GRPO)     sum over tokens / (N * max_len): a constant, so no length bias at all.

    N counts sequences with at least one token in ``mask`` (a fully masked sequence, e.g. a truncated one under
    ``overlong: mask``, is not part of the mean), except for ``dr_grpo``, whose divisor is the constant N x max_len.
    """
    if loss_type == "grpo":
        lengths = mask.sum(dim=1, keepdim=True)
        num_sequences = (lengths > 0).sum().clamp(min=1)
        return mask / lengths.clamp(min=1) / num_sequences
    if loss_type in ("bnpo", "dapo"):
        return mask / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if not max_len:
            raise ValueError("dr_grpo needs max_len, the constant that token sums are divided by")
        return mask / (mask.shape[0] * max_len)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_token_weights(mask: torch.Tensor) -> torch.Tensor:
    """``token_weights(mask, "grpo")``: the mean over sequences of each sequence's token mean."""
    return token_weights(mask, "grpo")


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``mask`` restricted to the ``quantile`` share of its tokens with the highest entropy (Wang et al. 2025,
    "Beyond the 80/20 Rule", train on the top 20%): tokens with entropy >= the batch's (1 - quantile) quantile."""
    if quantile >= 1:
        return mask
    real = entropy[mask.bool()]
    if real.numel() == 0:
        return mask
    threshold = torch.quantile(real.float(), 1 - quantile)
    return mask * (entropy >= threshold).to(mask.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)
