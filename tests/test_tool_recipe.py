"""The tool recipe: a multiplication task, cold-start traces that call the Python tool, SFT that never trains on
the tool's output, and the config that chains them into GRPO episodes."""

import json
import re
from pathlib import Path

import pytest

from rewards import get_reward
from rlreason.cli import main
from rlreason.config import load_config
from rlreason.models import load_tokenizer
from rlreason.training.sft import IGNORE, encode_conversation, load_chat_jsonl, tool_traces
from tasks import load_task
from tasks.environments import get_environment
from tasks.environments.python_tool import closed_program
from tasks.prompts import R1_SYSTEM_PROMPT
from tasks.sources import problem_key

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tool.yaml"
QUESTION = re.compile(r"What is (\d+) \* (\d+)\?")


def operands(row: dict) -> tuple[int, int]:
    a, b = QUESTION.fullmatch(row["prompt"][-1]["content"]).groups()
    return int(a), int(b)


@pytest.fixture(scope="module")
def python_tool():
    return get_environment("python_tool")


def policy_text(reply: list[dict]) -> str:
    return "".join(m["content"] for m in reply if m["role"] == "assistant")


@pytest.mark.parametrize("digits", [2, 3, 4])
def test_splits_are_disjoint_and_every_answer_is_the_product(digits):
    train = load_task("multiplication", "train", 300, seed=0, digits=digits).to_list()
    held_out = load_task("multiplication", "eval", 40, seed=0, digits=digits).to_list()
    keys = [{problem_key(row["prompt"][-1]["content"]) for row in split} for split in (train, held_out)]
    assert len(keys[0]) == 300 and len(keys[1]) == 40 and not keys[0] & keys[1]
    accuracy = get_reward("math_accuracy")
    for row in train + held_out:
        a, b = operands(row)
        assert len(str(a)) == len(str(b)) == digits and row["answer"] == str(a * b)
        reasoning = row["solution"].split("\n")[1].rstrip(".")
        assert {eval(side) for side in reasoning.split(" = ")} == {a * b}  # every line of the hand working holds
        assert accuracy([row["solution"], policy_text(row["tool_solution"])], [row, row]) == [1.0, 1.0]


def test_tool_traces_round_trip_through_the_environment(python_tool):
    rows = load_task("multiplication", "train", 6, seed=0).to_list()
    conversations = tool_traces(python_tool, rows)
    for row, messages in zip(rows, conversations, strict=True):
        a, b = operands(row)
        assert messages[:2] == python_tool.reset(row) and messages[0]["content"] != R1_SYSTEM_PROMPT
        call, output, final = messages[2:]
        assert closed_program(call["content"].removesuffix("\n")) == f"print({a} * {b})\n"
        observation, done = python_tool.step({"row": row, "turn": 1, "turns": []}, call["content"])
        assert not done and observation["content"] == output["content"] == f"```output\n{a * b}\n```\n"
        assert output["inline"] and "error" not in observation
        assert final["content"].endswith(f"<answer>{a * b}</answer>")


def test_a_trace_the_tool_would_not_give_is_refused(python_tool):
    row = load_task("multiplication", "train", 1, seed=0).to_list()[0]
    call, output, final = row["tool_solution"]
    wrong = {**output, "content": output["content"].replace("\n```", "1\n```", 1)}
    with pytest.raises(ValueError, match="row 0: the environment answers"):
        tool_traces(python_tool, [{**row, "tool_solution": [call, wrong, final]}])
    past_the_stop = {**call, "content": call["content"] + "and then"}
    with pytest.raises(ValueError, match="must end at the first stop string"):
        tool_traces(python_tool, [{**row, "tool_solution": [past_the_stop, output, final]}])
    with pytest.raises(ValueError, match="does not end the episode"):
        tool_traces(python_tool, [{**row, "tool_solution": [call, output, call]}])


def test_sft_labels_cover_the_policy_segments_only(tiny_llama, python_tool):
    tokenizer = load_tokenizer(str(tiny_llama))
    row = load_task("multiplication", "train", 1, seed=0).to_list()[0]
    messages = tool_traces(python_tool, [row])[0]
    call, output, final = (m["content"] for m in messages[2:])
    ids, labels = encode_conversation(tokenizer, messages)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == prompt + call + output + final + "<|end|>"
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert [ids[i] for i in trained] == [labels[i] for i in trained]
    assert tokenizer.decode([ids[i] for i in trained]) == call + final + "<|end|>"
    n_prompt, n_call, n_output = (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (prompt, call, output))
    observation = range(n_prompt + n_call, n_prompt + n_call + n_output)
    assert tokenizer.decode(ids[observation.start : observation.stop]) == output
    assert all(labels[i] == IGNORE for i in [*range(n_prompt), *observation])
    assert all(labels[i] != IGNORE for i in range(len(ids)) if i >= n_prompt and i not in observation)


def test_a_user_turn_between_assistant_turns_still_ends_the_prompt(tiny_llama):
    """Only inline observations join segments into one reply: an earlier assistant turn stays in the prompt."""
    tokenizer = load_tokenizer(str(tiny_llama))
    messages = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, labels = encode_conversation(tokenizer, messages)
    assert tokenizer.decode([t for t in labels if t != IGNORE]) == "4<|end|>"


def test_traces_command_writes_what_the_config_trains_on(tmp_path):
    out = tmp_path / "tool.jsonl"
    assert main(["traces", "--task", "multiplication", "--env", "python_tool", "--n", "4", "--out", str(out)]) == 0
    conversations = load_chat_jsonl(out)
    assert [[m["role"] for m in c] for c in conversations] == [["system", "user", "assistant", "tool", "assistant"]] * 4
    config = load_config(CONFIG, [f"sft.data={out}"])
    assert (config.task.name, config.rollout.env, config.model.name) == ("multiplication", "python_tool", "default")
    assert [r.name for r in config.rewards] == ["math_accuracy", "think_format"]
    rows = load_task(config.task.name, "train", 4, seed=0, **config.task.options).to_list()
    env = get_environment(config.rollout.env, **config.rollout.env_options)
    assert [c[:2] for c in conversations] == [env.reset(row) for row in rows]  # SFT and RL see the same prompt
    with pytest.raises(SystemExit, match="no tool_solution"):
        main(["traces", "--task", "arithmetic", "--env", "python_tool", "--n", "2", "--out", str(tmp_path / "x.jsonl")])
    assert json.loads(out.read_text().splitlines()[0])["messages"][3]["inline"] is True
