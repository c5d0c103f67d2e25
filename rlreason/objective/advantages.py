"""Group-relative advantages and reward shaping: pure functions on [num_prompts, G] tensors.

GRPO (DeepSeekMath, Shao et al. 2024) replaces PPO's value network with the group itself: a completion's
advantage is its reward minus the mean reward of the G completions of the same prompt, divided by a std.
The variants are small, marked differences:

- baseline: the group mean (GRPO), or the mean of the *other* G - 1 rewards (RLOO: Kool et al. 2019,
  Ahmadian et al. 2024), which is the group-mean advantage times G / (G - 1).
- scale: the group's std (GRPO), the whole batch's std (Liu et al. 2025, "Tricks or Traps?"), or none
  (Dr. GRPO, Liu et al. 2025: the std division up-weights prompts that are nearly always or never solved).
- reward shaping before the baseline: DAPO's soft overlong punishment (Yu et al. 2025) and a KL penalty folded
  into the reward (PPO for RLHF, Ziegler et al. 2019).

Left out: per-token advantages (every completion token gets its sequence's advantage), value baselines, and
any normalisation across processes (each process computes advantages for the groups it sampled).
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
"""Added to the std so a group whose rewards are all equal gets zero advantage, not a division by zero."""

ESTIMATORS = ("group", "rloo")
SCALES = ("group", "batch", "none")


def _check(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 2, got shape {tuple(rewards.shape)}")


def scale_advantages(centred: torch.Tensor, rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """Divide by the std of each group's rewards, of the whole batch's rewards, or by nothing (unbiased std)."""
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    if scale == "none":
        return centred
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def centred_rewards(rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """r - baseline, and exactly 0 in a group whose rewards are all equal: the mean of G equal float32 rewards can
    be off by a rounding (1.2 - mean(1.2 x 8) = 1.2e-7), which the std's division would turn into an advantage of
    1e-3 where there is no signal."""
    return torch.where(zero_variance_groups(rewards).unsqueeze(1), 0.0, rewards - baseline)


def group_advantages(rewards: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """GRPO: r - mean(group), then scaled (``scale_advantages``); std is the unbiased sample std, as in TRL."""
    _check(rewards)
    return scale_advantages(centred_rewards(rewards, rewards.mean(dim=1, keepdim=True)), rewards, scale)


def rloo_advantages(rewards: torch.Tensor, scale: str = "none") -> torch.Tensor:
    """RLOO: r_i - mean of the other G - 1 rewards of the group, then scaled (``scale_advantages``)."""
    _check(rewards)
    G = rewards.shape[1]
    leave_one_out = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)  # <- the one difference from GRPO
    return scale_advantages(centred_rewards(rewards, leave_one_out), rewards, scale)


def compute_advantages(rewards: torch.Tensor, estimator: str = "group", scale: str = "group") -> torch.Tensor:
    """The estimator chosen by name (``train.advantage``), [num_prompts, G] -> [num_prompts, G]."""
    if estimator == "group":
        return group_advantages(rewards, scale)
    if estimator == "rloo":
        return rloo_advantages(rewards, scale)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[num_prompts] bool: groups whose rewards are all equal, so every advantage is 0 (DAPO drops them)."""
    _check(rewards)
    return rewards.max(dim=1).values == rewards.min(dim=1).values


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to ``max_len - buffer`` tokens, then falling
    linearly to -1 at ``max_len`` (and -1 beyond): (max_len - buffer - length) / buffer, clamped to [-1, 0]."""
    return ((max_len - buffer - lengths) / buffer).clamp(min=-1.0, max=0.0)


def kl_penalised_rewards(rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """KL folded into the reward: r - beta * sum over the completion's tokens of the per-token KL estimate.

    ``rewards`` [num_prompts, G]; ``kl`` and ``mask`` [num_prompts * G, L], rows in group order.
    """
    return rewards - beta * (kl * mask).sum(dim=1).view_as(rewards)
