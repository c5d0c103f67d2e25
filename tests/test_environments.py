"""The built-in environments: the Python tool (hostile programs end their turn with a bounded, flagged observation
and the episode goes on; the stop fires only after a python block) and the number-guessing game (its replies, its
rows, its reward), driven by hand-written turns, through the episode runner and in tiny training runs."""

from __future__ import annotations

import re
import time

import pytest
import torch
from conftest import build_char_tokenizer, write_config

from rewards import get_reward
from rewards.episodes import parse_guess
from rlreason.cli import main
from rlreason.observe.runlog import read_jsonl
from rlreason.rollout.engine import Rollout, SamplingParams, left_pad
from rlreason.rollout.episodes import EpisodeLimits, run_episodes, stop_cut
from tasks import load_task
from tasks.environments import get_environment
from tasks.environments.guess_number import REMINDER
from tasks.environments.python_tool import PythonTool
from tasks.guess_number import secrets_of

CAP = 200
TIMEOUT = 1.0
OVERHEAD = len("```output\n") + len("\n[stopped: printed more than 1048576 bytes]") + len("\n```\n")
"""The most an observation adds to the program's capped output: its fences and one line saying why it failed."""


@pytest.fixture(scope="module")
def tool() -> PythonTool:
    return get_environment("python_tool", timeout=TIMEOUT, max_output_chars=CAP, memory_mb=64, preload=())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("chars"))


def state(row: dict | None = None) -> dict:
    return {"row": row or {}, "turn": 1, "turns": []}


def call(program: str) -> str:
    return f"Let me check.\n```python\n{program}\n```\n"


class Scripted:
    """An engine that writes ``play(context)`` then an end of message: hand-written turns through the real runner."""

    def __init__(self, tokenizer, play):
        self.tokenizer, self.play = tokenizer, play
        self.eos_ids = [tokenizer.eos_token_id]

    def generate(self, prompt_ids, n, sampling, seeds=None) -> Rollout:
        texts = [self.play(self.tokenizer.decode(p)) for p in prompt_ids for _ in range(n)]
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + self.eos_ids for t in texts]
        width = max(map(len, ids))
        prompt, prompt_mask = left_pad([p for p in prompt_ids for _ in range(n)], self.tokenizer.pad_token_id)
        return Rollout(
            prompt_ids=prompt, prompt_mask=prompt_mask,
            completion_ids=torch.tensor([i + [self.tokenizer.pad_token_id] * (width - len(i)) for i in ids]),
            completion_mask=torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
            texts=texts, truncated=torch.zeros(len(ids), dtype=torch.bool),
        )


# ---------------------------------------------------------------- the Python tool

def test_a_program_s_output_comes_back_inline(tool):
    observation, done = tool.step(state(), call("import sys\nprint(6 * 7)\nprint('note', file=sys.stderr)"))
    assert not done
    assert observation == {"role": "tool", "content": "```output\n42\nnote\n```\n", "inline": True}


HOSTILE = {
    "hangs": ("while True:\n    pass", "[timed out after 1 s]"),
    "sleeps": ("import time\nprint('started')\ntime.sleep(60)", "started\n[timed out after 1 s]"),
    "floods": ("while True:\n    print('y' * 1000)", "[stopped: printed more than"),
    "raises": ("print('before')\n1 / 0", "ZeroDivisionError: division by zero\n[exit code 1]"),
    "exits": ("import os\nos._exit(3)", "[exit code 3]"),
    "segfaults": ("import ctypes\nctypes.string_at(0)", "[killed by SIGSEGV]"),
    "hogs memory": ("block = bytearray(1 << 30)", "MemoryError"),
}


def test_hostile_programs_end_their_turn_with_a_bounded_flagged_observation(tool):
    texts = [call(program) for program, _ in HOSTILE.values()]
    started = time.monotonic()
    answers = tool.step_batch([state() for _ in texts], texts)
    assert time.monotonic() - started < 10 * TIMEOUT  # the hanging ones were killed at their timeout
    for (name, (_, expected)), (observation, done) in zip(HOSTILE.items(), answers, strict=True):
        assert not done, name
        assert observation["error"] is True and observation["inline"], name
        content = observation["content"]
        assert content.startswith("```output\n") and content.endswith("\n```\n"), name
        assert len(content) <= CAP + OVERHEAD, (name, len(content))
        assert expected in content, (name, content)
    flood = answers[list(HOSTILE).index("floods")][0]["content"]
    assert "...[truncated]...\n" in flood


def test_long_output_keeps_its_head_and_tail_and_is_no_failure(tool):
    observation, _ = tool.step(state(), call("for i in range(1000):\n    print(i)"))
    content = observation["content"]
    assert "error" not in observation
    assert content.startswith("```output\n0\n1\n2\n") and content.endswith("\n998\n999\n```\n")
    assert "\n...[truncated]...\n" in content and len(content) <= CAP + OVERHEAD


def test_the_turn_stops_only_where_a_python_block_closes(tool, tokenizer):
    assert not any(stop in "```python\n" for stop in tool.stop)
    text = "think\n```python\nprint(1)\n```\nmore text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[: stop_cut(ids, tokenizer, tool.stop)]) == "think\n```python\nprint(1)\n```\n"

    # a bare block and a block of the policy's own output stop the turn too; it resumes with nothing added
    episode = state()
    for false_stop in ("a table:\n```\n", "x | y\n```\n", "I expect\n```output\n3\n```\n"):
        assert tool.step(episode, false_stop) == ("", False)
    observation, done = tool.step(episode, "so:\n```python\nprint('ran')\n```\n")
    assert observation["content"] == "```output\nran\n```\n" and not done



def test_the_last_python_block_of_the_turn_runs(tool):
    text = "```python\nprint('first')\n``` which ended inline, then\n```python\nprint('second')\n```\n"
    observation, _ = tool.step(state(), text)
    assert observation["content"] == "```output\nsecond\n```\n"


def test_a_turn_without_a_call_ends_the_episode(tool):
    assert tool.step(state(), "<think>easy</think><answer>4</answer>") == (None, True)
    assert tool.step(state(), "```python\nprint(1)\n```") == (None, True)  # closed right at the end of the message
    assert tool.step(state(), "```python\nx = 5\n") == (None, True)  # the message ended inside the block


def test_reset_explains_the_tool_in_place_of_the_row_s_system_prompt(tool):
    row = load_task("arithmetic", "train", 1)[0]
    messages = tool.reset(row)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[1] == row["prompt"][-1]
    system = messages[0]["content"]
    assert system != row["prompt"][0]["content"]
    assert all(part in system for part in ("```python", "```output", "<answer>", "1 s"))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="max_output_chars"):
        PythonTool(max_output_chars=10)
    with pytest.raises(ValueError, match="timeout"):
        PythonTool(timeout=0)


PROGRAMS = ["import os\nos._exit(9)", "while True:\n    print('spam')", "while True:\n    pass", "print(40 + 2)"]


def test_an_episode_goes_on_after_failed_calls(tool, tokenizer):
    def play(context: str) -> str:
        written = context.split("<|assistant|>")[-1]
        calls = written.count("```output\n")
        return call(PROGRAMS[calls]) if calls < len(PROGRAMS) else "<answer>42</answer>"

    rows = [{"prompt": [{"role": "user", "content": "What is 40 + 2?"}]}]
    rollout = run_episodes(Scripted(tokenizer, play), tokenizer, tool, rows, 2, SamplingParams(400),
                           EpisodeLimits(max_turns=6, max_tokens=4000))
    for turns, text, observed, mask, truncated in zip(rollout.turns, rollout.texts, rollout.observation_mask,
                                                      rollout.completion_mask, rollout.truncated, strict=True):
        assert [t["role"] for t in turns] == ["assistant", "tool"] * 4 + ["assistant"]
        tools = [t for t in turns if t["role"] == "tool"]
        assert [bool(t.get("error")) for t in tools] == [True, True, True, False]
        assert tools[-1]["content"] == "```output\n42\n```\n"
        assert int(observed.sum()) == sum(t["tokens"] for t in tools) > 0
        assert "```output" not in text and text.endswith("<answer>42</answer>")
        assert int(mask.sum()) == int(observed.sum()) + len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + end of message
        assert not truncated


def test_a_training_step_with_the_tool_completes(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, run_dir,
        task={"name": "arithmetic", "train_size": 8, "eval_size": 2},
        rollout={"env": "python_tool", "env_options": {"timeout": 1, "preload": []}, "max_turns": 2,
                 "max_new_tokens": 8},
        train={"steps": 1}, run={"eval_before": False},
    )
    assert main(["train", str(config)]) == 0
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert len(completions) == 2 * 4 and all(c["turns"][0]["role"] == "assistant" for c in completions)
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]


# ---------------------------------------------------------------- the number-guessing game

def test_the_game_replies_higher_lower_correct():
    game = get_environment("guess_number")
    episode = state({"answer": "37", "prompt": []})
    assert game.step(episode, "<think>middle</think><guess>50</guess>") == ({"role": "user", "content": "lower"}, False)
    assert game.step(episode, "<guess> 20 </guess>") == ({"role": "user", "content": "higher"}, False)
    assert game.step(episode, "no guess here") == ({"role": "user", "content": REMINDER}, False)
    assert game.step(episode, "<guess>37</guess>") == ({"role": "user", "content": "correct"}, True)
    assert game.stop == ("</guess>",) and parse_guess("<guess>1</guess> then <guess>2</guess>") == 2


def test_the_reward_scores_the_final_guess_of_the_turns():
    solved = get_reward("guess_number_solved")

    def episode(*guesses: str) -> list[dict]:
        turns = []
        for guess in guesses:
            turns += [{"role": "assistant", "content": guess}, {"role": "user", "content": "lower", "tokens": 3}]
        return turns[:-1]

    game = {"task": "guess_number", "answer": "37"}
    samples = [
        {**game, "turns": episode("<guess>50</guess>", "<guess>37</guess>")},
        {**game, "turns": episode("<guess>37</guess>", "<guess>20</guess>")},  # the final guess counts
        {**game, "turns": episode("<guess>37</guess>", "I give up")},  # a turn without a guess keeps the last one
        {**game, "turns": episode("no guess at all")},
        {**game},  # a plain completion is a one-turn episode
        {"task": "arithmetic", "answer": "37", "turns": episode("<guess>37</guess>")},
    ]
    completions = ["ignored"] * 4 + ["<guess>37</guess>", "<guess>37</guess>"]
    assert solved(completions, samples) == [1.0, 0.0, 1.0, 0.0, 1.0, None]


def test_game_rows_keep_eval_secrets_out_of_training():
    train, held_out = secrets_of("train", 1, 100), secrets_of("eval", 1, 100)
    assert sorted(train + held_out) == list(range(1, 101)) and held_out and len(train) > len(held_out)
    rows = load_task("guess_number", "train", 2 * len(train), seed=3)
    answers = [int(a) for a in rows["answer"]]
    assert set(answers) == set(train)  # a size beyond the split's secrets draws them again, never an eval one
    assert answers[: len(train)] != sorted(answers[: len(train)])  # shuffled
    assert set(int(a) for a in load_task("guess_number", "eval", 30)["answer"]) == set(held_out)
    assert rows.to_list() == load_task("guess_number", "train", 2 * len(train), seed=3).to_list()
    assert "between 1 and 100" in rows[0]["prompt"][-1]["content"] and set(rows["task"]) == {"guess_number"}
    with pytest.raises(ValueError, match="widen"):
        load_task("guess_number", "eval", 1, low=train[0], high=train[0])


def halving(context: str) -> str:
    """A player that halves the range it has left, reading the replies so far from its context."""
    guesses = [int(g) for g in re.findall(r"<guess>(\d+)</guess>", context)]
    replies = re.findall(r"<\|user\|>(higher|lower)<\|end\|>", context)
    low, high = 1, 100
    for guess, reply in zip(guesses, replies, strict=True):
        low, high = (guess + 1, high) if reply == "higher" else (low, guess - 1)
    return f"<think>between {low} and {high}</think><guess>{(low + high) // 2}</guess>"


@pytest.mark.parametrize(("player", "solved"), [(halving, 1.0), (lambda context: "<guess>50</guess>", 0.0)])
def test_episodes_of_the_game_are_scored_from_their_turns(tokenizer, player, solved):
    rows = [row for row in load_task("guess_number", "train", 12) if row["answer"] != "50"]
    rollout = run_episodes(Scripted(tokenizer, player), tokenizer, get_environment("guess_number"), rows, 1,
                           SamplingParams(64), EpisodeLimits(max_turns=7, max_tokens=2000))
    scores = get_reward("guess_number_solved")(rollout.texts, [{**r, "turns": t} for r, t in zip(rows, rollout.turns, strict=True)])
    assert scores == [solved] * len(rows)
    for turns in rollout.turns:
        assert [t["role"] for t in turns[:2]] == ["assistant", "user"] and turns[1]["content"] in ("higher", "lower")
        assert sum(t["role"] == "assistant" for t in turns) == (len(turns) + 1) // 2 <= 7
    if solved:  # halving ends each game on its correct guess, before the turn limit
        assert any(sum(t["role"] == "assistant" for t in turns) < 7 for turns in rollout.turns)


def test_a_training_step_of_the_game_completes(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, run_dir,
        task={"name": "guess_number", "train_size": 8, "eval_size": 2},
        rewards=[{"name": "guess_number_solved"}],
        rollout={"env": "guess_number", "max_turns": 3, "max_new_tokens": 8},
        train={"steps": 1}, run={"eval_before": False},
    )
    assert main(["train", str(config)]) == 0
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert len(completions) == 2 * 4
    assert all(set(c["rewards"]) == {"guess_number_solved"} and c["turns"] for c in completions)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1] and "rewards/guess_number_solved" in metrics[0]
