"""Supervised fine-tuning on chat traces: the R1 cold start that teaches the output format before RL.

Loss is taken on the assistant's final turn only; the prompt is tokenized exactly as the rollout tokenizes it,
so what SFT teaches is what generation continues from. The data is text, so any causal LM can be the student
(distillation): each conversation is re-tokenized with the student's own tokenizer and chat template.

Packing (``sft.pack``) lays a step's conversations end to end instead of padding each to the longest. Position ids
restart at every conversation and no attention mask is passed, which makes transformers' attention block-diagonal
(its packed-sequence masks), so the loss is the padded path's up to float error; tests/test_sft.py checks that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlreason.data import PromptStream
from tasks.prompts import render

IGNORE = -100


def load_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from JSONL lines ``{"messages": [...]}`` whose last message is the assistant's."""
    conversations = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'messages' list ({exc})") from exc
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"{path}:{number}: the last message must be the assistant's")
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Input ids and labels (IGNORE on the prompt) for one conversation, ending with an end-of-turn token."""
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render(tokenizer, messages, add_generation_prompt=False)
    answer = full[len(prompt) :].rstrip() if full.startswith(prompt) else messages[-1]["content"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
        answer_ids.append(tokenizer.eos_token_id)
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices per row, first-fit decreasing: few, full rows; an example longer than ``capacity`` gets
    a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def _collate_packed(examples: list[tuple[list[int], list[int]]], capacity: int, pad_id: int) -> dict[str, torch.Tensor]:
    lengths = [len(ids) for ids, _ in examples]
    rows = pack_rows(lengths, capacity or max(lengths))
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            x, y = examples[i]
            ids[r, at : at + len(x)], labels[r, at : at + len(x)] = torch.tensor(x), torch.tensor(y)
            labels[r, at] = IGNORE  # a conversation's first token is never a target, as unpacked: not from the previous one
            positions[r, at : at + len(x)] = torch.arange(len(x))
            at += len(x)
        positions[r, at:] = torch.arange(width - at)  # trailing padding: a separate sequence, every label IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """The model inputs of one step: padded rows, or with ``pack_length`` packed rows of at most that many tokens
    (0: as many as the longest example)."""
    return _collate(examples, pad_id) if pack_length is None else _collate_packed(examples, pack_length, pad_id)


def run_sft(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    config: Any,
    accelerator: Accelerator,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """``config.steps`` AdamW steps of ``config.batch_size`` conversations (packed when ``config.pack``);
    returns the loss per step."""
    examples = [encode_conversation(tokenizer, m) for m in conversations]
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=config.learning_rate))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))
    stream = PromptStream(len(examples), seed)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="sft", disable=not progress)
    for _ in bar:
        chosen = [examples[i] for i in stream.take(config.batch_size)]
        inputs = collate(chosen, tokenizer.pad_token_id, config.pack_length if config.pack else None)
        loss = model(**{k: v.to(accelerator.device) for k, v in inputs.items()}, use_cache=False).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
