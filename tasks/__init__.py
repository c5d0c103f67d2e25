"""Datasets of prompts plus the fields their verifiers need, registered by name (see tasks.registry)."""

from tasks.mix import mix_tasks
from tasks.registry import load_task, task, task_names, task_rewards

__all__ = ["load_task", "mix_tasks", "task", "task_names", "task_rewards"]
