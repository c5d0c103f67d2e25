"""Prompts as the model sees them, and the order the trainer visits them in."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tasks.mix import mix_tasks
from tasks.prompts import render
from tasks.registry import load_task


def task_dataset(task_config: Any, split: str, seed: int) -> Dataset:
    """The rows of a config's task (or mixture of tasks) for ``split``."""
    size = task_config.train_size if split == "train" else task_config.eval_size
    if task_config.mix:
        specs = [(m["name"], float(m.get("weight", 1.0)), m.get("options", {})) for m in task_config.mix]
        return mix_tasks(specs, split, size, seed)
    return load_task(task_config.name, split, size, seed, **task_config.options)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], prefill: str = ""
) -> list[list[int]]:
    """Token ids of each row's chat prompt, ready for generation (the template already holds special tokens),
    then the start of the assistant's message (``rollout.prefill``).

    The prefill is tokenised on its own and appended, so every prompt ends with exactly its tokens: tokenised
    with the template, its first characters could merge with the generation prompt's last ones into other tokens.
    """
    texts = [render(tokenizer, row["prompt"]) for row in rows]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not prefill:
        return prompts
    start = tokenizer(prefill, add_special_tokens=False)["input_ids"]
    return [ids + start for ids in prompts]


class PromptStream:
    """Indices of training prompts in a seeded order, reshuffled each epoch.

    ``position`` (prompts handed out so far) is all a checkpoint needs to continue the exact same order.
    """

    def __init__(self, size: int, seed: int, position: int = 0):
        if size < 1:
            raise ValueError("the training split is empty")
        self.size, self.seed, self.position = size, seed, position

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            epoch, offset = divmod(self.position, self.size)
            order = self._order(epoch)
            chunk = order[offset : offset + count - len(indices)]
            indices += chunk
            self.position += len(chunk)
        return indices
