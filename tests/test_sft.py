"""The cold start: loss only on the assistant's answer, and SFT learns the traces."""

import json

import pytest
from accelerate import Accelerator

from rlreason.config import SFTConfig
from rlreason.models import load_model, load_tokenizer
from rlreason.sft import IGNORE, encode_conversation, load_chat_jsonl, run_sft
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
