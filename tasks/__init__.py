"""Datasets of prompts plus the fields their verifiers need, registered by name (see tasks.registry)."""

from tasks.registry import load_task, task, task_names

__all__ = ["load_task", "task", "task_names"]
