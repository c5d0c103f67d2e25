"""Episodes on tiny models: both engines give the same episodes, token ids are carried from turn to turn as
generated, and observation tokens carry no loss and no gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlreason.config import Config
from rlreason.objective.objective import Objective
from rlreason.rollout.engine import HFEngine, SamplingParams
from rlreason.rollout.episodes import EpisodeLimits, observation_ids, run_episodes, stop_cut, turn_seed
from rlreason.rollout.fast import FastEngine
from rlreason.training.groups import model_inputs
from rlreason.training.logprobs import logprobs_from_inputs

ROWS = [
    {"prompt": [{"role": "user", "content": "hello"}]},
    {"prompt": [{"role": "user", "content": "a longer prompt than that"}]},
]


class Alternating:
    """Answers the first turn inside the policy's message (a tool's output), later turns with a user message."""

    stop = ("x",)

    def reset(self, row):
        return row["prompt"]

    def step(self, state, text):
        if state["turn"] == 1:
            return f"[out {len(text)}]", False
        return {"role": "user", "content": f"again ({len(text)})"}, False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("episodes"), "llama", seed=3)
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def episodes(engine, tokenizer, n=3, max_tokens=120, env=None):
    sampling = SamplingParams(max_new_tokens=30)
    seeds = [11 * i + 5 for i in range(len(ROWS) * n)]
    return run_episodes(engine, tokenizer, env or Alternating(), ROWS, n, sampling, EpisodeLimits(4, max_tokens), seeds)


def test_both_engines_give_the_same_episodes(tiny):
    model, tokenizer = tiny
    reference = episodes(HFEngine(model, tokenizer), tokenizer)
    fast = episodes(FastEngine(model, tokenizer), tokenizer)
    assert torch.equal(reference.completion_ids, fast.completion_ids)
    assert torch.equal(reference.observation_mask, fast.observation_mask)
    assert reference.turns == fast.turns
    assert reference.texts == fast.texts
    # the episodes are real ones: several turns, both kinds of observation, and a turn cut at the stop string
    roles = [t["role"] for turns in reference.turns for t in turns]
    assert roles.count("tool") >= 1 and roles.count("user") >= 1
    assert any(t["content"].endswith("x") for turns in reference.turns for t in turns if t["role"] == "assistant")


def test_token_ids_are_carried_exactly_from_turn_to_turn(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    contexts = {}

    class Recording:
        eos_ids = engine.eos_ids

        def generate(self, prompt_ids, n, sampling, seeds=None):
            rows = [list(p) for p in prompt_ids for _ in range(n)]
            contexts.update(dict(zip(seeds, rows, strict=True)))
            return engine.generate(prompt_ids, n, sampling, seeds)

    rollout = episodes(Recording(), tokenizer, n=2)
    seeds = [11 * i + 5 for i in range(len(rollout.texts))]
    for row, seed in enumerate(seeds):
        ids = rollout.completion_ids[row, : int(rollout.completion_mask[row].sum())].tolist()
        observed = rollout.observation_mask[row, : len(ids)].tolist()
        prompt = rollout.prompt_ids[row, rollout.prompt_mask[row].bool()].tolist()
        # turn k starts where the policy's k-th run of tokens starts; its context is everything before, as generated
        starts = [i for i in range(len(ids)) if not observed[i] and (i == 0 or observed[i - 1])]
        assert len(starts) == sum(t["role"] == "assistant" for t in rollout.turns[row]) >= 1
        for turn, start in enumerate(starts):
            assert contexts[turn_seed(seed, turn)] == prompt + ids[:start]


def test_one_turn_episode_is_the_plain_completion(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)

    class Silent:
        stop = ()

        def reset(self, row):
            return row["prompt"]

        def step(self, state, text):
            return None, True

    seeds = [7, 8, 9, 10]
    rollout = run_episodes(engine, tokenizer, Silent(), ROWS, 2, SamplingParams(20), EpisodeLimits(3, 200), seeds)
    from rlreason.data import encode_prompts

    plain = engine.generate(encode_prompts(tokenizer, ROWS), 2, SamplingParams(20), seeds)
    width = plain.completion_ids.shape[1]
    assert torch.equal(rollout.completion_ids[:, :width] * plain.completion_mask, plain.completion_ids * plain.completion_mask)
    assert rollout.texts == plain.texts
    assert int(rollout.observation_mask.sum()) == 0
    assert turn_seed(5, 0) == 5 and turn_seed(5, 1) != turn_seed(5, 2)


def test_the_episode_budget_counts_observations(tiny):
    model, tokenizer = tiny
    rollout = episodes(HFEngine(model, tokenizer), tokenizer, max_tokens=40)
    assert int(rollout.completion_mask.sum(dim=1).max()) <= 40
    lengths = rollout.completion_mask.sum(dim=1)
    # an episode that used its whole budget is truncated
    assert all(bool(rollout.truncated[i]) for i in range(len(lengths)) if lengths[i] == 40)


def test_stop_cut_finds_the_shortest_prefix(tiny):
    _, tokenizer = tiny
    ids = tokenizer("ab```\ncd```\n", add_special_tokens=False)["input_ids"]
    cut = stop_cut(ids, tokenizer, ("```\n",))
    assert tokenizer.decode(ids[:cut]) == "ab```\n"
    assert stop_cut(ids, tokenizer, ("zz",)) is None


def test_a_chat_observation_closes_the_message_once(tiny):
    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    after_eos = observation_ids(tokenizer, {"role": "user", "content": "lower"}, eos)
    without = observation_ids(tokenizer, {"role": "user", "content": "lower"}, None)
    assert tokenizer.decode(after_eos) == "<|user|>lower<|end|><|assistant|>"
    assert without[0] == eos and without[1:] == after_eos
    assert tokenizer.decode(observation_ids(tokenizer, "[out 3]", eos)) == "[out 3]"


def test_observation_tokens_carry_no_loss_and_no_gradient(tiny):
    model, tokenizer = tiny
    rollout = episodes(HFEngine(model, tokenizer), tokenizer, n=2)
    observed = rollout.observation_mask.bool()
    assert observed.any()
    config = Config()
    config.train.micro_batch_size = len(rollout.texts)
    objective = Objective.from_config(config)
    weights = objective.weigh(rollout.loss_mask, rollout.truncated, None, objective.aggregate)
    assert float(weights.weights[observed].abs().sum()) == 0.0
    assert float(weights.weights[~observed & rollout.completion_mask.bool()].abs().min()) > 0

    (inputs,) = model_inputs(rollout, config, tokenizer.pad_token_id, torch.device("cpu"))
    captured = {}

    def keep_hidden(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    hook = model.model.norm.register_forward_hook(keep_hidden)
    try:
        logprobs, entropy = logprobs_from_inputs(model, inputs, temperature=1.0)
    finally:
        hook.remove()
    advantages = torch.linspace(-1, 1, len(rollout.texts))
    mask = inputs.trained_mask.float()
    from rlreason.objective.objective import FrozenPass

    frozen = objective.loss_inputs(FrozenPass(None, None, None))
    per_token, _ = objective.loss(logprobs, advantages, mask, frozen.select(slice(None), mask.shape[1]), entropy, weights.policy)
    (per_token * weights.weights).sum().backward()
    grad = captured["hidden"].grad.abs().sum(dim=-1)  # [rows, columns] of the input layout
    rows, cols = inputs.hidden_rows, inputs.hidden_cols
    is_observation = observed[inputs.out_rows, inputs.out_cols]
    # the hidden state that predicts an observation token gets no gradient; those predicting the policy's do
    assert float(grad[rows[is_observation], cols[is_observation]].sum()) == 0.0
    assert float(grad[rows[~is_observation], cols[~is_observation]].sum()) > 0.0


def make_alternating() -> Alternating:
    return Alternating()


def test_the_trainer_gives_observation_tokens_no_gradient(tiny_llama, tmp_path):
    from conftest import write_config

    from rlreason.config import load_config
    from rlreason.objective.objective import FrozenPass
    from rlreason.training.trainer import Trainer

    config = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
        rollout={"env": "test_episodes:make_alternating", "max_turns": 3, "max_new_tokens": 12},
        rewards=[{"name": "conftest:char_codes"}], train={"micro_batch_size": 8},
    )
    trainer = Trainer(load_config(config))
    batch = trainer._sample_groups(2, 4)
    rollout = batch.rollout
    assert rollout.observation_mask.bool().any()
    (inputs,) = trainer._model_inputs(rollout)
    captured = []

    def keep_hidden(module, args, output):
        output.retain_grad()
        captured.append(output)

    hook = trainer.model.model.norm.register_forward_hook(keep_hidden)
    try:
        trainer.optimize(rollout, torch.linspace(-1, 1, 8), FrozenPass(), lambda: [inputs])
    finally:
        hook.remove()
    grad = captured[-1].grad.abs().sum(dim=-1)
    is_observation = rollout.observation_mask.bool()[inputs.out_rows, inputs.out_cols]
    assert float(grad[inputs.hidden_rows[is_observation], inputs.hidden_cols[is_observation]].sum()) == 0.0
    assert float(grad[inputs.hidden_rows[~is_observation], inputs.hidden_cols[~is_observation]].sum()) > 0.0
