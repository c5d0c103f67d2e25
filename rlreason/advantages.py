"""Group-relative advantage estimators: pure functions on [num_prompts, G] reward tensors.

GRPO (DeepSeekMath, Shao et al. 2024) replaces PPO's value network with the group itself: each completion's
advantage is its reward minus the mean reward of the G completions of the same prompt, divided by the group's
standard deviation. Dr. GRPO (Liu et al. 2025) argues the std division biases towards easy/hard prompts and
drops it (``scale=False``).
"""

from __future__ import annotations

import torch

STD_EPS = 1e-4
"""Added to the std so a group whose rewards are all equal gets zero advantage, not a division by zero."""


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """(r - mean(group)) / (std(group) + eps); the std is the unbiased sample std, as in TRL."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_prompts, G] with G >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)
