"""Prompts as the model sees them, and the order the trainer visits them in."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tasks.prompts import render


def encode_prompts(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Token ids of each row's chat prompt, ready for generation (the template already holds special tokens)."""
    texts = [render(tokenizer, row["prompt"]) for row in rows]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


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
