"""Supervised fine-tuning on chat traces: the R1 cold start that teaches the output format before RL.

Loss is taken on the assistant's final turn only, less the tool outputs shown inside it (``encode_conversation``);
the prompt is tokenized exactly as the rollout tokenizes it, so what SFT teaches is what generation continues from. The data is text, so any causal LM can be the student
(distillation): each conversation is re-tokenized with the student's own tokenizer and chat template.

Packing (``sft.pack``) lays a step's conversations end to end instead of padding each to the longest. Position ids
restart at every conversation and no attention mask is passed, which makes transformers' attention block-diagonal
(its packed-sequence masks), so the loss is the padded path's up to float error; tests/test_sft.py checks that.

A step whose conversations all begin with the same tokens (a system prompt: most of a cold start's short traces)
computes that prefix once (``sft.shared_prefix``), in the tree layout GRPO's ``train.shared_prompt`` uses for a
group's prompt: each conversation's rest attends the prefix and itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rlreason.data import PromptStream
from rlreason.training.logprobs import (
    LogprobInputs,
    can_share_prompts,
    labelled_logprobs,
    logprob_inputs,
    logprobs_from_inputs,
)
from rlreason.training.packed_products import packed_products
from rlreason.training.setup import adamw
from tasks.environments import Environment, step_all
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


def reply_start(messages: list[dict[str, Any]]) -> int:
    """Where the final reply begins: the last message, and before it every inline observation together with the
    assistant segment it answered (a tool's output shown inside the policy's message)."""
    start = len(messages) - 1
    while start >= 2 and messages[start - 1].get("inline") and messages[start - 2].get("role") == "assistant":
        start -= 2
    return start


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Input ids and labels (IGNORE on the prompt) for one conversation, ending with an end-of-turn token.

    A final reply in segments (``reply_start``) is rendered as one assistant message and each segment is
    tokenized alone, as the episode runner tokenizes what the policy wrote and each observation apart; the inline
    observations get IGNORE labels, as the policy never writes them.
    """
    start = reply_start(messages)
    segments = messages[start:]
    content = "".join(m["content"] for m in segments)
    prompt = render(tokenizer, messages[:start], add_generation_prompt=True)
    full = render(tokenizer, [*messages[:start], {"role": "assistant", "content": content}], add_generation_prompt=False)
    answer = full[len(prompt) :].rstrip() if full.startswith(prompt) else content
    pieces = [m["content"] for m in segments]
    if answer.startswith(content):  # the template's end of message goes with the last segment
        pieces[-1] += answer[len(content) :]
    elif len(segments) == 1:  # a template that rewrites the message: its text is what generation continues from
        pieces = [answer]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids, labels = list(prompt_ids), [IGNORE] * len(prompt_ids)
    for message, piece in zip(segments, pieces, strict=True):
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += [IGNORE] * len(piece_ids) if message.get("inline") else piece_ids
    if len(ids) == len(prompt_ids) or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def tool_traces(env: Environment, rows: list[dict[str, Any]], field: str = "tool_solution") -> list[list[dict[str, Any]]]:
    """Conversations for a cold start with a tool: ``env.reset(row)`` and the row's segmented reply (``field``:
    policy segments and the inline observations between them), each checked against the environment.

    Every policy segment is stepped through ``env`` as a rollout would: one followed by an observation must end at
    the environment's stop string and get exactly that observation back; the last must end the episode. A trace
    that fails teaches what no episode would show, so it is refused, naming the row.
    """
    conversations = [list(env.reset(row)) for row in rows]
    states: list[dict[str, Any]] = [{"row": row, "turn": 0, "turns": []} for row in rows]
    replies = [list(row[field]) for row in rows]
    for k in range(0, max(len(reply) for reply in replies), 2):
        live = [i for i, reply in enumerate(replies) if k < len(reply)]
        if any(replies[i][k].get("role") != "assistant" for i in live):
            raise ValueError(f"every other segment of {field!r}, from the first, must be the assistant's")
        texts = [replies[i][k]["content"] for i in live]
        for i, text in zip(live, texts, strict=True):
            states[i]["turn"] += 1
            states[i]["turns"].append({"role": "assistant", "content": text})
            conversations[i].append({"role": "assistant", "content": text})
        answers = step_all(env, [states[i] for i in live], texts)
        for i, text, (observation, done) in zip(live, texts, answers, strict=True):
            expected = replies[i][k + 1] if k + 1 < len(replies[i]) else None
            _check_step(i, text, observation, done, expected, env.stop)
            if expected is not None:
                inline = isinstance(observation, str)
                message = {"role": "tool", "content": observation, "inline": True} if inline else dict(observation)
                states[i]["turns"].append(message)
                conversations[i].append(message)
    return conversations


def _check_step(
    row: int, text: str, observation: Any, done: bool, expected: dict[str, Any] | None, stop: tuple[str, ...]
) -> None:
    stops = [text.find(s) + len(s) for s in stop if s in text]
    if expected is None:
        if not done or stops:
            raise ValueError(f"row {row}: the reply's last segment does not end the episode: {text!r}")
        return
    if not expected.get("inline") or expected.get("role") == "assistant":
        raise ValueError(f"row {row}: a policy segment must be followed by an inline observation, got {expected!r}")
    if min(stops, default=-1) != len(text):
        raise ValueError(f"row {row}: a segment before an observation must end at the first stop string {stop}: {text!r}")
    got = observation if isinstance(observation, str) or observation is None else observation.get("content")
    if done or got != expected["content"]:
        raise ValueError(f"row {row}: the environment answers {got!r} (done: {done}), the trace shows {expected['content']!r}")


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


def shared_prefix_length(examples: list[tuple[list[int], list[int]]]) -> int:
    """The tokens every example begins with, up to the first label of any (a label inside the prefix would be one
    target standing for several)."""
    first = min(next((i for i, label in enumerate(labels) if label != IGNORE), len(labels)) for _, labels in examples)
    reference = examples[0][0]
    length = 0
    while length < first and all(ids[length] == reference[length] for ids, _ in examples):
        length += 1
    return length


def shared_prefix_inputs(examples: list[tuple[list[int], list[int]]], pad_id: int, rows_tokens: int) -> LogprobInputs | None:
    """The step's labels as ``logprob_inputs`` of one shared prompt (the common prefix) and each example's rest as
    its completion, with the head only on the labelled tokens; None when that computes no fewer tokens than the
    ``rows_tokens`` of the padded or packed rows."""
    prefix = shared_prefix_length(examples)
    rests = [(ids[prefix:], labels[prefix:]) for ids, labels in examples]
    if prefix == 0 or prefix + sum(len(ids) for ids, _ in rests) >= rows_tokens:
        return None
    width = max(len(ids) for ids, _ in rests)
    completion_ids = torch.full((len(rests), width), pad_id)
    completion_mask = torch.zeros((len(rests), width), dtype=torch.long)
    labelled = torch.zeros((len(rests), width), dtype=torch.bool)
    for row, (ids, labels) in enumerate(rests):
        completion_ids[row, : len(ids)], completion_mask[row, : len(ids)] = torch.tensor(ids), 1
        labelled[row, : len(ids)] = torch.tensor(labels) != IGNORE
    prompt_ids = torch.tensor(examples[0][0][:prefix]).expand(len(rests), -1)
    inputs = logprob_inputs(
        prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, shared_prompt=True, loss_mask=labelled
    )
    keep = labelled[completion_mask.bool()]  # the head runs only where a label is predicted
    return replace(
        inputs, hidden_rows=inputs.hidden_rows[keep], hidden_cols=inputs.hidden_cols[keep], targets=inputs.targets[keep],
        out_rows=inputs.out_rows[keep], out_cols=inputs.out_cols[keep],
    )


def step_inputs(
    examples: list[tuple[list[int], list[int]]], pad_id: int, config: Any, share: bool = True
) -> dict[str, torch.Tensor] | LogprobInputs:
    """One step's inputs for ``supervised_loss``: the shared-prefix layout when ``config.shared_prefix`` and
    ``share`` (the model can take it: ``can_share_prompts``) and it computes fewer tokens, else ``collate``'s packed
    or padded rows."""
    rows = collate(examples, pad_id, config.pack_length if config.pack else None)
    if not (config.shared_prefix and share):
        return rows
    return shared_prefix_inputs(examples, pad_id, rows["input_ids"].numel()) or rows


def supervised_loss(model: Any, inputs: dict[str, torch.Tensor] | LogprobInputs) -> torch.Tensor:
    """The mean negative log-likelihood of the labels (the model's own loss), computed the lean way: the head only
    where a label is predicted (``labelled_logprobs``, or the shared-prefix layout's ``logprobs_from_inputs``)."""
    if isinstance(inputs, LogprobInputs):
        return -logprobs_from_inputs(model, inputs)[0][inputs.trained_mask.bool()].mean()
    logprobs = labelled_logprobs(model, inputs["input_ids"], inputs["labels"], inputs.get("position_ids"), IGNORE)
    if logprobs is None:
        return model(**inputs, use_cache=False).loss
    return -logprobs.mean()


def run_sft(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    config: Any,
    accelerator: Accelerator,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """``config.steps`` AdamW steps of ``config.batch_size`` conversations (``step_inputs``); returns the loss per
    step."""
    examples = [encode_conversation(tokenizer, m) for m in conversations]
    optimizer = accelerator.prepare(adamw(list(model.parameters()), accelerator.device, lr=config.learning_rate))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))
    stream = PromptStream(len(examples), seed)
    share = can_share_prompts(model)
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="sft", disable=not progress)
    for _ in bar:
        chosen = [examples[i] for i in stream.take(config.batch_size)]
        inputs = step_inputs(chosen, tokenizer.pad_token_id, config, share)
        on_device = inputs.to(accelerator.device) if isinstance(inputs, LogprobInputs) else {k: v.to(accelerator.device) for k, v in inputs.items()}
        with packed_products(model):
            loss = supervised_loss(model, on_device)
            accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
