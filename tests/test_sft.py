"""The cold start: loss only on the assistant's answer, packing equals padding, and SFT learns the traces."""

import json
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from conftest import make_tiny_model

import rlreason.training.logprobs as lp_module
from rlreason.config import SFTConfig
from rlreason.models import load_model, load_tokenizer
from rlreason.training.logprobs import LogprobInputs
from rlreason.training.sft import (
    IGNORE,
    collate,
    encode_conversation,
    load_chat_jsonl,
    pack_rows,
    run_sft,
    shared_prefix_inputs,
    shared_prefix_length,
    step_inputs,
    supervised_loss,
)
from tasks.prompts import chat


def test_labels_cover_only_the_answer_and_its_end_token(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    ids, labels = encode_conversation(tokenizer, [*chat("1+1?"), {"role": "assistant", "content": "<answer>2</answer>"}])
    answer = [t for t in labels if t != IGNORE]
    assert tokenizer.decode(answer) == "<answer>2</answer><|end|>"
    assert labels[: len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))
    prompt_text = tokenizer.apply_chat_template(chat("1+1?"), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[: len(ids) - len(answer)]) == prompt_text


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: the last message must be the assistant's"):
        load_chat_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: expected a JSON object"):
        load_chat_jsonl(path)


def test_sft_fits_the_traces(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    conversations = [[*chat(f"{a}+1?"), {"role": "assistant", "content": f"<answer>{a + 1}</answer>"}] for a in range(4)]
    losses = run_sft(model, tokenizer, conversations, SFTConfig(steps=40, batch_size=4, learning_rate=3e-3), Accelerator(cpu=True), progress=False)
    assert losses[-1] < 0.3 * losses[0]


def test_pack_rows_fills_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 7, 2, 9], 10) == [[4], [2, 1], [0, 3]]
    assert pack_rows([12, 1], 10) == [[0], [1]]  # too long for a row: a row of its own, never cut


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_packed_loss_equals_padded_loss(tmp_path, arch):
    """Attention never crosses conversations in a packed row: the loss is the padded one to float error."""
    model_dir = make_tiny_model(tmp_path, arch)
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    conversations = [[*chat(f"{a}+{7 * a}?", system=""), {"role": "assistant", "content": "x" * 3 * a * a + f"<answer>{8 * a}</answer>"}] for a in range(1, 7)]
    examples = [encode_conversation(tokenizer, m) for m in conversations]
    packed = collate(examples, tokenizer.pad_token_id, pack_length=0)  # rows as wide as the longest conversation
    padded = collate(examples, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1] and packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        padded_loss = model(**padded, use_cache=False).loss
        packed_loss = model(**packed, use_cache=False).loss
        leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
        leaky_loss = model(**leaky, use_cache=False).loss  # one long sequence per row: conversations see each other
    assert torch.allclose(packed_loss, padded_loss, rtol=0, atol=1e-5)
    assert not torch.allclose(leaky_loss, padded_loss, rtol=0, atol=1e-4), "the check must be able to fail"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pack", [False, True])
def test_lean_supervised_loss_equals_the_models_own(tmp_path, arch, pack, monkeypatch):
    """The head only where a label is predicted: the same loss and gradients as the model's full-logits loss. On the
    CPU attention runs as plain products in every layer, under the mask transformers makes for packed rows."""
    model_dir = make_tiny_model(tmp_path, arch)
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    conversations = [[*chat(f"{a}+{7 * a}?"), {"role": "assistant", "content": "y" * a * a + f"<answer>{8 * a}</answer>"}] for a in range(1, 6)]
    inputs = collate([encode_conversation(tokenizer, m) for m in conversations], tokenizer.pad_token_id, 0 if pack else None)
    attended, attend = [], lp_module._attend
    monkeypatch.setattr(lp_module, "_attend", lambda *a: attended.append(1) or attend(*a))
    losses, grads = [], []
    for compute in (supervised_loss, lambda m, x: m(**x, use_cache=False).loss):
        model.zero_grad()
        attended.clear()
        loss = compute(model, inputs)
        if compute is supervised_loss:
            assert len(attended) == model.config.num_hidden_layers
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    shifted = {**inputs, "labels": torch.roll(inputs["labels"], 1, dims=1)}
    assert not torch.allclose(supervised_loss(model, shifted), losses[1], rtol=0, atol=1e-3), "the check must be able to fail"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_loss_and_gradients_equal_the_padded_ones(tmp_path, arch):
    """A step's common system prompt computed once: the same loss and gradients as every conversation in full."""
    model_dir = make_tiny_model(tmp_path, arch)
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    conversations = [[*chat(f"{a}+{7 * a}?"), {"role": "assistant", "content": "z" * a * a + f"<answer>{8 * a}</answer>"}] for a in range(1, 6)]
    examples = [encode_conversation(tokenizer, m) for m in conversations]
    padded = collate(examples, tokenizer.pad_token_id)
    shared = step_inputs(examples, tokenizer.pad_token_id, SFTConfig(pack=False))
    assert isinstance(shared, LogprobInputs)
    prefix = shared_prefix_length(examples)
    assert prefix > 0 and shared.input_ids.numel() < padded["input_ids"].numel()
    assert len(shared.targets) == int((padded["labels"] != IGNORE).sum())  # the head only where a label is predicted
    losses, grads = [], []
    for inputs in (padded, shared):
        model.zero_grad()
        loss = supervised_loss(model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(losses[0], losses[1], rtol=0, atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    unshared = SFTConfig(pack=False, shared_prefix=False)
    assert not isinstance(step_inputs(examples, tokenizer.pad_token_id, unshared), LogprobInputs)
    restarted = shared.position_ids - prefix * (shared.shared.segment > 0)  # each rest's positions from 0: wrong
    wrong = supervised_loss(model, replace(shared, position_ids=restarted))
    assert not torch.allclose(wrong, losses[0], rtol=0, atol=1e-5), "the check must be able to fail"


def test_shared_prefix_stops_at_the_first_label_and_needs_a_saving():
    examples = [([1, 2, 3, 4, 5], [IGNORE, IGNORE, 3, 4, 5]), ([1, 2, 3, 9], [IGNORE, IGNORE, IGNORE, 9])]
    assert shared_prefix_length(examples) == 2  # 3 is a label of the first: a shared copy would count it once
    assert shared_prefix_length([([1, 2], [IGNORE, 2]), ([7, 2], [IGNORE, 2])]) == 0
    assert shared_prefix_inputs(examples, 0, rows_tokens=2 + 3 + 2) is None  # no fewer tokens than the rows
    assert shared_prefix_inputs(examples, 0, rows_tokens=8) is not None
