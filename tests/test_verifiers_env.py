"""Environments written for the ``verifiers`` library, run unchanged: a user's module of ``load_*`` functions.

The adapter is checked against verifiers' own rollout loop (``env.rollout`` with a client that replays
hand-written turns), and the reward against the env's rubric called directly on that rollout's states.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest
from conftest import write_config

from rewards.registry import get_reward
from rewards.verifiers_rubric import rubric_results, verifiers_rubric
from rewards.vf_envs import load_environment, run, vf_input
from rlreason.cli import main
from rlreason.config import RolloutConfig, TaskConfig
from rlreason.observe.runlog import read_jsonl
from tasks.environments import get_environment
from tasks.registry import load_task
from tasks.verifiers_task import config_problems

GAMES = '''
import verifiers as vf
from datasets import Dataset

SUMS = [(a, b) for a in range(1, 6) for b in range(1, 6)]


def load_quiz(system_prompt="Answer inside <answer></answer>."):
    """A SingleTurnEnv: sums, a sync and an async reward function and a group one."""
    parser = vf.XMLParser(["answer"], answer_field="answer")

    def correct(completion, answer, parser):
        return 1.0 if parser.parse_answer(completion) == answer else 0.0

    async def formatted(completion, parser):
        return 1.0 if parser.parse_answer(completion) is not None else 0.0

    def shortest(completions) -> list[float]:
        lengths = [len(c[-1]["content"]) for c in completions]
        return [1.0 if n == min(lengths) else 0.0 for n in lengths]

    rubric = vf.Rubric(funcs=[correct, formatted, shortest], weights=[1.0, 0.25, 0.1], parser=parser)
    dataset = Dataset.from_list([{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in SUMS])
    return vf.SingleTurnEnv(dataset=dataset, system_prompt=system_prompt, parser=parser, rubric=rubric)


class Guess(vf.MultiTurnEnv):
    """Guess the number: higher or lower after each wrong guess, the game over at the right one."""

    async def setup_state(self, state):
        state["guesses"] = 0
        return state

    async def env_response(self, messages, state, **kwargs):
        state["guesses"] += 1
        guess = messages[-1]["content"].strip()
        if guess == state["answer"]:
            state["final_env_response"] = [vf.UserMessage(content="Correct!")]
            return state["final_env_response"]
        low = guess.isdigit() and int(guess) < int(state["answer"])
        return [vf.UserMessage(content="Higher." if low else "Lower."), vf.UserMessage(content="Again?")]

    @vf.stop
    async def gave_up(self, state):
        steps = state["trajectory"]
        return bool(steps) and steps[-1]["completion"][-1]["content"].strip() == "give up"


def load_guess(max_turns=3, stop=("\\n",)):
    """A MultiTurnEnv subclass: its own stop condition and rewards that read what env_response left in state."""

    def won(state):
        return 1.0 if state.get("final_env_response") else 0.0

    async def fewer_guesses(state):
        return 1.0 / (1 + state["guesses"])

    rubric = vf.Rubric(funcs=[won, fewer_guesses], weights=[1.0, 0.5])
    rows = [{"question": "Guess my number, 1 to 9.", "answer": str(n), "info": {"n": n}} for n in range(1, 10)]
    return Guess(
        dataset=Dataset.from_list(rows[:7]),
        eval_dataset=Dataset.from_list(rows[7:]),
        system_prompt="Reply with a number.",
        max_turns=max_turns,
        rubric=rubric,
        sampling_args={"stop": list(stop)},
    )
'''

QUIZ = {"load": "vf_user_games:load_quiz"}
GUESS = {"load": "vf_user_games:load_guess", "args": {"max_turns": 3}}


@pytest.fixture(scope="module", autouse=True)
def games(tmp_path_factory):
    """The user's module, importable as a module next to their config would be."""
    directory = tmp_path_factory.mktemp("user")
    (directory / "vf_user_games.py").write_text(textwrap.dedent(GAMES))
    sys.path.insert(0, str(directory))
    yield
    sys.path.remove(str(directory))


def scripted_client(texts):
    """A verifiers client that answers each model call with the next of ``texts`` (verifiers' own loop runs)."""
    from verifiers.legacy.clients import Client
    from verifiers.legacy.types import Response, ResponseMessage

    class Scripted(Client):
        def setup_client(self, config):
            return None

        async def to_native_tool(self, tool):
            return tool

        async def to_native_prompt(self, messages):
            return messages, {}

        async def get_native_response(self, prompt, model, sampling_args, tools=None, **kwargs):
            return texts.pop(0)

        async def raise_from_native_response(self, response):
            return None

        async def from_native_response(self, response):
            message = ResponseMessage(content=response, finish_reason="stop", is_truncated=False)
            return Response(id="scripted", created=int(time.time()), model="scripted", message=message)

        async def close(self):
            return None

    return Scripted(None)


def vf_rollout(env, row, texts):
    """verifiers' own rollout of the row's problem, the model's turns being ``texts``, finished as it finishes one."""
    return run(env.rollout(vf_input(env, row), scripted_client(list(texts)), "scripted"))


def scored_as_verifiers_scores(env, states):
    """The env's rubric on verifiers' own rollout states, a group as its evaluation scores one."""
    run(env.rubric.score_group(states))
    return states


def adapter_episode(adapter, row, texts, limit=None):
    """Our runner's view: each turn stepped through the adapter until it says done, or until the runner's own
    turn ``limit``, whose turn it ends the episode on without asking the environment."""
    state = {"row": row, "turn": 0, "turns": []}
    replies = []
    for turn, text in enumerate(texts, 1):
        state["turn"] = turn
        state["turns"].append({"role": "assistant", "content": text})
        if turn == limit:
            break
        observation, done = adapter.step(state, text)
        replies.append((observation, done))
        if done:
            break
        state["turns"].append(observation)
    return state, replies


def row_with_answer(rows, answer):
    return next(row for row in rows if row["answer"] == answer)


@pytest.fixture(scope="module")
def guess_rows():
    return load_task("verifiers", "train", 7, seed=0, **GUESS).to_list()


@pytest.mark.parametrize(
    ("texts", "stop"),
    [
        (["3", "5"], "has_final_env_response"),
        (["1", "2", "3", "4"], "max_turns_reached"),
        (["2", "give up"], "gave_up"),
    ],
)
def test_the_adapter_answers_as_verifiers_own_rollout_does(guess_rows, texts, stop):
    row = row_with_answer(guess_rows, "5")
    env = load_environment(row["vf_env"])
    expected = vf_rollout(env, row, texts)
    # the policy's turns end at the env's stop string, which a server leaves out of the text it returns
    state, replies = adapter_episode(get_environment("verifiers", **GUESS), row, [f"{t}\n" for t in texts])

    trajectory = expected["trajectory"]
    assert [done for _, done in replies] == [False] * (len(trajectory) - 1) + [True]
    for before, after, (observation, _) in zip(trajectory, trajectory[1:], replies, strict=False):
        told = after["prompt"][len(before["prompt"]) + len(before["completion"]) :]
        assert observation == {"role": "user", "content": "\n\n".join(m.content for m in told)}
    ours = state["vf"].state
    assert ours["stop_condition"] == expected["stop_condition"] == stop
    assert [s["completion"][0].content for s in ours["trajectory"]] == [s["completion"][0].content for s in trajectory]
    assert ours["guesses"] == expected["guesses"]


def test_a_single_turn_env_ends_after_its_first_turn_and_keeps_its_formatting():
    rows = load_task("verifiers", "train", 6, seed=1, **QUIZ).to_list()
    row = rows[0]
    assert row["prompt"][0] == {"role": "system", "content": "Answer inside <answer></answer>."}
    assert row["prompt"][1]["role"] == "user" and row["task"] == "verifiers"
    observation, done = get_environment("verifiers", **QUIZ).step({"row": row, "turn": 1, "turns": []}, "x")
    assert (observation, done) == (None, True)


def test_the_reward_is_the_rubric_on_the_same_episodes(guess_rows):
    adapter = get_environment("verifiers", **GUESS)
    transcripts = [["3", "5"], ["5"], ["9", "give up"], ["1", "2", "3"]]
    row = row_with_answer(guess_rows, "5")
    env = load_environment(row["vf_env"])
    samples, completions, expected = [], [], []
    for texts in transcripts:
        state, _ = adapter_episode(adapter, row, texts, limit=3)  # the runner's max_turns is the env's
        samples.append({**row, "turns": state["turns"]})
        completions.append("".join(texts))
        expected.append(vf_rollout(env, row, texts))
    scored_as_verifiers_scores(env, expected)

    assert verifiers_rubric(completions, samples) == pytest.approx([s["reward"] for s in expected])
    # the rewards read the state env_response left: 2, 1, 1 and 2 guesses
    results = rubric_results(completions, samples)
    assert [r[1]["fewer_guesses"] for r in results] == pytest.approx([1 / 3, 0.5, 0.5, 1 / 3])
    # the turn the runner ended the last episode on is in its state, as verifiers' last model response is
    assert [r[1]["num_turns"] for r in results] == [len(s["trajectory"]) for s in expected] == [2, 1, 2, 3]
    metric = get_reward("rewards.verifiers_rubric:metric_won")
    assert metric(completions, samples) == [s["metrics"]["won"] for s in expected] == [1.0, 1.0, 0.0, 0.0]


def test_a_completion_without_turns_is_scored_as_the_rubric_scores_it():
    rows = load_task("verifiers", "train", 4, seed=2, **QUIZ).to_list()
    row = rows[0]
    env = load_environment(row["vf_env"])
    texts = [f"<answer>{row['answer']}</answer>", "<answer>0</answer> and more", "no tags"]
    expected = scored_as_verifiers_scores(env, [vf_rollout(env, row, [t]) for t in texts])
    samples = [dict(row) for _ in texts]  # no turns: a run without rollout.env
    scores = verifiers_rubric(texts, samples)
    assert scores == pytest.approx([s["reward"] for s in expected])
    assert scores == pytest.approx([1.0 + 0.25, 0.25, 0.1])  # "shortest" is a group function
    assert verifiers_rubric(["x"], [{"prompt": [], "task": "gsm8k"}]) == [None]


def test_train_and_eval_rows_come_from_the_env_s_datasets_disjointly():
    train = load_task("verifiers", "train", 7, seed=0, **GUESS)
    held_out = load_task("verifiers", "eval", 2, seed=0, **GUESS)
    assert sorted(train["answer"]) == [str(n) for n in range(1, 8)]
    assert sorted(held_out["answer"]) == ["8", "9"] and set(held_out["vf_split"]) == {"eval_dataset"}
    assert json.loads(held_out[0]["info"]) == {"n": int(held_out[0]["answer"])}
    # without an eval_dataset the dataset is divided by problem: no prompt in both
    quiz = [load_task("verifiers", split, 2, seed=0, **QUIZ)["prompt"] for split in ("train", "eval")]
    assert not {m[-1]["content"] for m in quiz[0]} & {m[-1]["content"] for m in quiz[1]}
    with pytest.raises(ValueError, match="has only 7 problems"):
        load_task("verifiers", "train", 8, seed=0, **GUESS)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({}, "task.options.load: missing"),
        ({"load": "vf_no_such_module:load"}, "task.options.load: cannot import module 'vf_no_such_module'"),
        ({"load": "vf_user_games:load_nothing"}, "task.options.load: module 'vf_user_games' has no function 'load_nothing'"),
        ({"load": "vf_user_games:load_quiz", "args": {"turns": 2}}, "task.options.args: vf_user_games:load_quiz does not take"),
        ({"load": "vf_user_games:load_quiz", "arg": {}}, "task.options: unknown option(s) ['arg']"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(options, problem, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # a module not found adds the working directory to it
    problems = config_problems(TaskConfig(name="verifiers", options=options), RolloutConfig())
    assert len(problems) == 1 and problems[0].startswith(problem) and "\n" not in problems[0]
    with pytest.raises(ValueError) as raised:
        load_task("verifiers", "train", 1, **options)
    assert str(raised.value) == problems[0]


def test_the_environment_runs_the_rows_of_its_own_environment_only(guess_rows):
    other_task = config_problems(TaskConfig(name="gsm8k"), RolloutConfig(env="verifiers", env_options=QUIZ))
    assert other_task == ["rollout.env: 'verifiers' runs the rows of the task 'verifiers' only, not of ['gsm8k']"]
    with pytest.raises(ValueError, match="rollout.env_options name the environment"):
        get_environment("verifiers", **QUIZ).reset(guess_rows[0])
    assert get_environment("verifiers").reset(guess_rows[0]) == guess_rows[0]["prompt"]
    with pytest.raises(ValueError, match="rollout.env_options.load: missing"):
        get_environment("verifiers", args={"max_turns": 2})


def test_a_verifiers_env_runs_a_training_step(tiny_llama, tmp_path):
    """Stop strings common enough for a random model to end its turns, so that episodes have several."""
    options = {"load": GUESS["load"], "args": {"max_turns": 3, "stop": list("aeiouAEIOU0123456789 ")}}
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_llama,
        run_dir,
        task={"name": "verifiers", "options": options, "train_size": 6, "eval_size": 2},
        rollout={"env": "verifiers", "max_turns": 3, "max_new_tokens": 6, "max_episode_tokens": 96},
        train={"steps": 1},
        rewards=[
            {"name": "verifiers_rubric"},
            {"name": "rewards.verifiers_rubric:metric_won", "weight": 0},
            {"name": "rewards.verifiers_rubric:metric_fewer_guesses", "weight": 0},
        ],
    )
    assert main(["train", str(config)]) == 0
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert len(completions) == 2 * 4
    assert max(sum(t["role"] == "assistant" for t in line["turns"]) for line in completions) > 1
    for line in completions:
        assert line["turns"][0]["role"] == "assistant"
        # each user turn is a guess env_response answered; a right guess ends the game without one
        guesses = sum(t["role"] == "user" for t in line["turns"]) + line["rewards"]["rewards.verifiers_rubric:metric_won"]
        assert line["rewards"]["rewards.verifiers_rubric:metric_fewer_guesses"] == pytest.approx(1 / (1 + guesses))
