"""The R1-Zero recipe: a prefilled assistant message (rollout.prefill), soft format credit, and its configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards.format import is_strict_r1, r1_parts, think_format_soft
from rewards.registry import get_reward
from rlreason.config import load_config
from rlreason.data import encode_prompts
from rlreason.rollout.engine import HFEngine, SamplingParams
from rlreason.rollout.episodes import complete, scored_samples
from rlreason.rollout.fast import FastEngine
from rlreason.scoring import WeightedReward, score

ROOT = Path(__file__).resolve().parents[1]
PREFILL = "<think>\n"
ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
    {"prompt": [{"role": "user", "content": "What is 40 + 12?"}], "answer": "52"},
]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def test_prompts_end_with_the_prefill_tokens(tiny):
    _, tokenizer = tiny
    plain = encode_prompts(tokenizer, ROWS)
    prefilled = encode_prompts(tokenizer, ROWS, PREFILL)
    tail = tokenizer(PREFILL, add_special_tokens=False)["input_ids"]
    assert tail
    for ids, base in zip(prefilled, plain, strict=True):
        assert ids == base + tail


@pytest.mark.parametrize("engine_class", [HFEngine, FastEngine])
def test_completions_continue_the_prefill_and_rewards_read_it(tiny, engine_class):
    model, tokenizer = tiny
    engine = engine_class(model, tokenizer)
    seeds = [3, 4, 5, 6]
    sampling = SamplingParams(max_new_tokens=12)
    plain = complete(engine, tokenizer, ROWS, 2, sampling, seeds, None)
    rollout = complete(engine, tokenizer, ROWS, 2, sampling, seeds, None, PREFILL)
    tail = torch.tensor(tokenizer(PREFILL, add_special_tokens=False)["input_ids"])
    for row in rollout.prompt_ids:  # left-padded: each prompt's last tokens are the prefill's
        assert torch.equal(row[-len(tail) :], tail)
    for ids, mask, text in zip(rollout.completion_ids, rollout.completion_mask, rollout.texts, strict=True):
        generated = tokenizer.decode(ids[: int(mask.sum())], skip_special_tokens=True)
        assert text == PREFILL + generated  # the prefill is in the text, never in the sampled (trained) tokens
    assert not torch.equal(plain.completion_ids, rollout.completion_ids)  # the model was conditioned on it
    soft = [WeightedReward("think_format_soft", 1.0, get_reward("think_format_soft"))]
    seen = score(rollout.texts, scored_samples(ROWS, 2, rollout), soft).total
    unseen = score(plain.texts, scored_samples(ROWS, 2, plain), soft).total
    assert min(seen) >= 0.25 and max(unseen) == 0.0


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", 0),
        ("The answer is 5.", 0),
        ("<answer>5</answer>", 0),  # an answer without thinking earns nothing
        ("<answer>5</answer><think>2+3=5</think>", 2),  # the answer came first: only the think block counts
        ("<think>\n2+3 is 5", 1),  # never closed (a prefilled message that runs on)
        ("<think>\n  \n</think><answer>5</answer>", 1),  # an empty think block is not closed with content
        ("<think>2+3=5</think> so 5", 2),
        ("<think>2+3=5</think><answer> </answer>", 2),  # an empty answer block
        ("<think>2+3=5</think><answer>5", 2),  # answer never closed
        ("<think>2+3=5</think>\n<answer>5</answer> done", 3),  # text after the answer: not strict
        ("Sure. <think>2+3=5</think><answer>5</answer>", 3),  # text before the think block
        ("<think>2+3=5</think><answer>5</answer><answer>6</answer>", 2),
        ("<think>\n2+3=5\n</think>\n<answer>5</answer>\n", 4),
    ],
)
def test_soft_format_counts_the_parts_in_order(text, parts):
    assert r1_parts(text) == parts
    assert think_format_soft([text], [{}]) == [0.25 * parts]
    assert (parts == 4) is is_strict_r1(text)


def test_soft_format_is_registered_and_full_only_for_the_strict_layout():
    reward = get_reward("think_format_soft")
    texts = ["<think>a</think><answer>b</answer>", "<think>a</think><answer>b</answer>!", "<think>a"]
    assert reward(texts, [{}] * 3) == [1.0, 0.75, 0.25]
    assert get_reward("think_format")(texts, [{}] * 3) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["zero.yaml"])
def test_zero_configs_load_as_pure_rl_with_the_prefill(name, tmp_path):
    config = load_config(ROOT / "configs" / name, [f"run.output_dir={tmp_path / 'run'}"])
    assert config.sft.steps == 0 or config.sft.data is None
    assert config.rollout.prefill == PREFILL
    assert config.rollout.engine == "fast"
    names = [r.name for r in config.rewards]
    assert "think_format_soft" in names and names[0] == "math_accuracy"
    assert config.run.eval_every > 0


def test_many_answer_blocks_earn_no_answer_credit():
    """What a pure-RL run on the default model converged to when several answer blocks still earned the third part."""
    farmed = "<think>\n89</think><answer>45</answer><answer>9</answer><answer>9</answer><answer>9</answer>"
    assert think_format_soft([farmed, "<think>\n89 + 45 = 134</think><answer>134</answer>"], [{}, {}]) == [0.5, 1.0]
