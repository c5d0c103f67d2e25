"""The reference rollout engine: group layout, masks, truncation."""

import torch

from rlreason.models import load_model, load_tokenizer
from rlreason.rollout.engine import HFEngine, SamplingParams, completion_mask, left_pad


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[4, 9, 2, 2], [4, 4, 4, 4], [2, 5, 2, 5]])
    mask, truncated = completion_mask(ids, eos_ids=[2, 9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_groups_are_contiguous_and_greedy_groups_identical(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    prompts = [
        tokenizer("abc", add_special_tokens=False)["input_ids"],
        tokenizer("x", add_special_tokens=False)["input_ids"],
    ]
    rollout = HFEngine(model, tokenizer).generate(prompts, 3, SamplingParams(max_new_tokens=5, greedy=True))
    assert rollout.completion_ids.shape[0] == 6 and len(rollout.texts) == 6
    assert rollout.texts[0] == rollout.texts[1] == rollout.texts[2]
    assert rollout.prompt_ids[0].tolist() == rollout.prompt_ids[2].tolist() != rollout.prompt_ids[3].tolist()
    assert rollout.completion_mask.shape == rollout.completion_ids.shape
    assert (
        rollout.truncated.tolist() == (rollout.completion_mask.sum(1) == 5).tolist()
        or not rollout.truncated.any()
    )


def test_sampling_is_seeded(tiny_llama):
    tokenizer, model = load_tokenizer(str(tiny_llama)), load_model(str(tiny_llama))
    prompt = [tokenizer("hi", add_special_tokens=False)["input_ids"]]
    engine = HFEngine(model, tokenizer)
    torch.manual_seed(1)
    a = engine.generate(prompt, 4, SamplingParams(max_new_tokens=6)).texts
    torch.manual_seed(1)
    b = engine.generate(prompt, 4, SamplingParams(max_new_tokens=6)).texts
    assert a == b and len(set(a)) > 1
