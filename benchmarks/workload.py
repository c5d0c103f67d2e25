"""What both sides of benchmarks/throughput.py run on: the model shapes, the prompts and the reward.

Nothing here downloads anything: models are random-init from a config (or the default model from its cached GGUF
conversion), prompts are two-number sums in the R1 chat format, and the reward is a cheap string statistic, so the
measured time is the trainers' own.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

# Llama shapes of the SmolLM2 family and of a 1.7B model, and Qwen2-7B's shape (built as a Qwen2 model: QKV bias,
# untied embeddings; see QWEN2), all with the vocabulary of the tokenizer given (SmolLM2's by default).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
}

# The shapes built as Qwen2Config rather than LlamaConfig (Qwen2-7B's rope theta and norm epsilon).
QWEN2 = {"7b"}

SYSTEM = (
    "You are a helpful assistant. Think step by step inside <think> </think> tags, "
    "then give only the final answer inside <answer> </answer> tags."
)


def rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` chat prompts "What is a + b?" with their answers (the same list on both sides)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
        out.append({"prompt": prompt, "answer": str(a + b), "task": "throughput_bench"})
    return out


def digit_share(completions: list[str], samples: list[dict] | None = None, **_: Any) -> list[float]:
    """The reward of both sides: the share of digits in the completion (cheap, and it varies within a group)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # TRL passes chat messages
    return [sum(map(str.isdigit, t)) / max(len(t), 1) for t in texts]


def build_model(name: str, directory: Path, tokenizer: Any, dtype: torch.dtype, seed: int = 0) -> Path:
    """Write the model ``name`` ("default" or a key of SHAPES, random init) with ``tokenizer`` to ``directory``, in
    ``dtype`` (throughput.py passes bfloat16 on a GPU: the 7B shape's float32 init would take about 30 GB of RAM)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if name == "default":
        from rlreason.models import resolve

        model = AutoModelForCausalLM.from_pretrained(resolve("default"), dtype=dtype)
    else:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if name in QWEN2:  # Qwen2 attention has biases on q, k and v
            config = Qwen2Config(
                **SHAPES[name],
                vocab_size=len(tokenizer),
                max_position_embeddings=8192,
                rope_theta=1000000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                **special,
            )
        else:
            config = LlamaConfig(
                **SHAPES[name],
                vocab_size=len(tokenizer),
                max_position_embeddings=8192,
                rope_theta=100000.0,
                rms_norm_eps=1e-5,
                tie_word_embeddings=name != "1.7b",
                **special,
            )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
