"""Verifiable reward functions, registered by name (see rewards.registry)."""

from rewards.registry import RewardFn, get_reward, reward, reward_names

__all__ = ["RewardFn", "get_reward", "reward", "reward_names"]
