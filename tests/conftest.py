"""Fixtures: a character-level tokenizer with a chat template, and tiny random-init models built from configs.

Nothing here touches a hub: every model is built locally from a config in a temporary directory.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """One token per printable character: tiny vocabulary, so tiny models train in seconds."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(dict.fromkeys(string.printable)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|end|>",
        pad_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[1:4],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_config(arch: str, vocab_size: int, eos_id: int):
    """A two-layer model of ``arch`` small enough for a CPU test step in well under a second."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=eos_id,
    )
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "deepseek_v3":
        # mixture of experts with multi-head latent attention, one dense layer then one MoE layer
        common["num_key_value_heads"] = common["num_attention_heads"]  # MLA shares its latent across heads
        return DeepseekV3Config(
            **common,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        )
    raise ValueError(arch)


def make_tiny_model(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    import torch

    tokenizer = build_char_tokenizer(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_config(path: Path, model_dir: Path, run_dir: Path, **sections: dict) -> Path:
    """A small run config for tests: tiny batches, short completions, no progress bar."""
    import yaml

    config = {
        "model": {"name": str(model_dir)},
        "task": {"name": "arithmetic", "train_size": 64, "eval_size": 8},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 8},
        "train": {"steps": 2, "learning_rate": 1e-3, "micro_batch_size": 4},
        "run": {"output_dir": str(run_dir), "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values) if isinstance(values, dict) else config.__setitem__(
            section, values
        )
    path.write_text(yaml.safe_dump(config))
    return path


def problems_of(overrides: list[str], path: Path | None = None) -> list[str]:
    """The problems a config with ``overrides`` is refused for (it must be refused)."""
    from rlreason.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def sevens(completions: list[str], samples: list[dict]) -> list[float]:
    """A reward any tiny model can earn by chance and learn: the share of '7' characters in the completion."""
    return [c.count("7") / len(c) if c else 0.0 for c in completions]


def char_codes(completions: list[str], samples: list[dict]) -> list[float]:
    """A dense reward that differs between almost any two completions: mean character code, scaled to ~[0, 1]."""
    return [sum(map(ord, c)) / len(c) / 128 if c else 0.0 for c in completions]


def flat_on_the_first_process(completions: list[str], samples: list[dict]) -> list[float]:
    """``char_codes``, but 0 for every completion the first process of an ``accelerate launch`` scores: its groups
    are all flat, so it has nothing to train while the others do."""
    return [0.0] * len(completions) if os.environ.get("RANK", "0") == "0" else char_codes(completions, samples)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is one per process and keeps the first mixed precision asked for, so a test's trainer would
    get whatever an earlier test asked for (or fail on a different ask): every test starts afresh and leaves none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

