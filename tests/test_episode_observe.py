"""Episodes in a run's log: the per-step episode metrics, the turns in completions.jsonl, and both readers
(``rlreason inspect``, the HTML report) marking what the environment wrote apart from the policy's turns."""

import contextlib
import html
import io
import json
import re
import shutil
import string
import subprocess

import numpy as np
import pytest
from conftest import write_config

from rlreason.cli import main
from rlreason.observe.inspect_run import load_run
from rlreason.observe.report import report_data, write_report
from rlreason.observe.runlog import read_jsonl
from rlreason.scoring import Scores
from rlreason.training.step_log import (
    ReasoningInputs,
    StepRecord,
    StepTimes,
    completion_rows,
    gather_step,
    metrics_row,
)

ANSWERS = {
    1: "out:1",
    2: {"role": "tool", "content": "Error: boom", "inline": True, "error": True},
    3: {"role": "user", "content": "again?"},
}


class Answers:
    """A tool's output after turn 1, a failed tool call after turn 2, the user after turn 3. Every printable
    character ends a turn, so even an untrained model reaches all of them."""

    stop = tuple(string.printable)

    def reset(self, row):
        return row["prompt"]

    def step(self, state, text):
        return ANSWERS.get(state["turn"]), False


def make_env():
    return Answers()


TOOLS_AND_ERROR = [
    {"role": "assistant", "content": "let me run it"},
    {"role": "tool", "content": "out:1", "tokens": 5},
    {"role": "assistant", "content": "again"},
    {"role": "tool", "content": "Traceback: boom", "tokens": 3, "error": True},
    {"role": "assistant", "content": "the answer is 1"},
]
ASKED_BY_USER = [
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "are you sure?", "tokens": 4},
    {"role": "assistant", "content": "yes, 2"},
]


def _record(turns, observation_tokens, total=(1.0, 0.0)) -> StepRecord:
    n = len(total)
    return StepRecord(
        samples=[{"prompt": [{"role": "user", "content": "what is 1?"}], "task": "t", "answer": "1"}] * n,
        texts=[f"completion {i}" for i in range(n)],
        scores=Scores(["acc"], np.array([[t] for t in total]), np.array(total)),
        advantages=[0.5, -0.5][:n], lengths=[3.0] * n, truncated=[False] * n, stats={}, tokens=3 * n,
        turns=turns, observation_tokens=observation_tokens,
    )


def _metrics(record: StepRecord, group_size: int = 2) -> dict:
    reasoning = ReasoningInputs([], lambda texts: [len(t) for t in texts])
    return metrics_row(record, 1, group_size, StepTimes(1.0, 1.0, 1.0), reasoning, {})


def _episode(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("episode/")}


def test_metrics_are_per_episode_means_of_turns_tool_calls_errors_and_observation_tokens():
    metrics = _metrics(_record([TOOLS_AND_ERROR, ASKED_BY_USER], [8, 4]))
    # turns (3 + 2) / 2; tool calls (2 + 0) / 2, the user's message is no tool call; errors (1 + 0) / 2
    assert _episode(metrics) == {
        "episode/turns": 2.5, "episode/tool_calls": 1.0, "episode/tool_errors": 0.5, "episode/observation_tokens": 6.0,
    }
    assert _episode(_metrics(_record(None, None))) == {}  # plain completions log no episode metrics


def test_gathered_steps_keep_every_process_episodes_in_order():
    first = _record([TOOLS_AND_ERROR, ASKED_BY_USER], [8, 4])
    second = _record([ASKED_BY_USER, ASKED_BY_USER], [4, 4])
    record = gather_step(first, lambda _: [first, second])
    assert record.turns == [TOOLS_AND_ERROR, ASKED_BY_USER, ASKED_BY_USER, ASKED_BY_USER]
    assert record.observation_tokens == [8, 4, 4, 4]
    assert _episode(_metrics(record)) == {
        "episode/turns": 2.25, "episode/tool_calls": 0.5, "episode/tool_errors": 0.25, "episode/observation_tokens": 5.0,
    }
    assert gather_step(_record(None, None), lambda parts: parts * 2).turns is None


def test_completion_rows_carry_the_episode_turns():
    rows = completion_rows(_record([TOOLS_AND_ERROR, ASKED_BY_USER], [8, 4]), 1)
    assert [r["turns"] for r in rows] == [TOOLS_AND_ERROR, ASKED_BY_USER]
    assert all("turns" not in r for r in completion_rows(_record(None, None), 1))


def _episode_run(path):
    """A run directory by hand: one step of two episodes with its episode metrics, and two evaluations."""
    path.mkdir()
    (path / "config.yaml").write_text(json.dumps({"rollout": {"env": "python_tool", "max_turns": 3}}))
    metrics = [
        {"step": s, "reward": 0.5, "episode/turns": 2.0 + s, "episode/tool_calls": 1.0, "episode/tool_errors": 0.5 * s,
         "episode/observation_tokens": 6.0 * s}
        for s in (1, 2)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    base = {"step": 1, "prompt": "what is 1?", "answer": "1", "advantage": 0.0, "length": 9}
    rows = [
        {**base, "completion": "let me run itagainthe answer is 1", "rewards": {"acc": 1.0}, "total": 1.0, "turns": TOOLS_AND_ERROR},
        {**base, "completion": "2\nyes, 2", "rewards": {"acc": 0.0}, "total": 0.0, "turns": ASKED_BY_USER},
    ]
    (path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample = {"prompt": "what is 1?", "answer": "1"}
    evals = [
        {"step": 0, "stage": "base", "accuracy": 0.0, "samples": [{**sample, "completion": "2", "rewards": {"acc": 0.0}, "turns": ASKED_BY_USER}]},
        {"step": 2, "stage": "final", "accuracy": 1.0, "samples": [{**sample, "completion": "1", "rewards": {"acc": 1.0}, "turns": TOOLS_AND_ERROR}]},
    ]
    (path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return path


def cli(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out


POLICY = "      "


def test_inspect_prints_episodes_turn_by_turn_with_observations_marked(tmp_path, capsys):
    run_dir = _episode_run(tmp_path / "run")
    for args in (("--step", 1), ("--best", 2), ("--grep", "answer")):
        lines = cli(capsys, run_dir, *args).splitlines()
        assert "   [tool] out:1" in lines and "   [tool error] Traceback: boom" in lines, args
        assert f"{POLICY}let me run it" in lines and f"{POLICY}the answer is 1" in lines, args
        assert not any(line.startswith(POLICY) and ("out:1" in line or "boom" in line) for line in lines), args
    out = cli(capsys, run_dir, "--step", 1)
    assert "   [user] are you sure?" in out.splitlines()
    assert "3 turns  2 tool calls (1 failed)  8 observation tokens" in out
    assert "2 turns  0 tool calls  4 observation tokens" in out


def test_inspect_diff_and_summary_show_episodes(tmp_path, capsys):
    run_dir = _episode_run(tmp_path / "run")
    diff = cli(capsys, run_dir, "--diff", "base", "final")
    assert "| 2 [user] are you sure? yes, 2" in diff
    assert "| let me run it [tool] out:1 again [tool error] Traceback: boom the answer is 1" in diff
    summary = cli(capsys, run_dir)
    assert "episodes  env python_tool   up to 3 turns each" in summary
    for name, first, last in (("episode/turns", 3, 4), ("episode/tool_errors", 0.5, 1), ("episode/observation_tokens", 6, 12)):
        assert re.search(rf"^{re.escape(name)} +[▁-█]{{2}}  {first} -> {last} ", summary, re.MULTILINE), name


def _dom(page, tmp_path, fragment: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "needs Debian's chromium, which `make test` installs"
    return subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
            f"{page.as_uri()}#{fragment}",
        ],
        capture_output=True, timeout=60, check=True,
    ).stdout.decode()


def test_html_report_shows_episodes_turn_by_turn_with_observations_marked(tmp_path):
    run = load_run(_episode_run(tmp_path / "run"))
    data = report_data(run)
    titles = {p["title"]: [s["name"] for s in p["series"]] for p in data["plots"]}
    assert titles["Episode turns and tool calls"] == ["episode/turns", "episode/tool_calls", "episode/tool_errors"]
    assert titles["Observation tokens per episode"] == ["episode/observation_tokens"]
    assert [s["turns"] for s in data["sources"][0]["samples"]] == [TOOLS_AND_ERROR, ASKED_BY_USER]

    dom = _dom(write_report(run, tmp_path / "r.html"), tmp_path, "source=step-1&order=best")
    turns = re.findall(r'<div class="turn ([a-z ]+)"><span class="role">([^<]*)</span><pre>([^<]*)</pre></div>', dom)
    assert [(kind, html.unescape(label), text) for kind, label, text in turns] == [
        ("policy", "policy · turn 1", "let me run it"),
        ("observation tool", "tool · 5 tokens", "out:1"),
        ("policy", "policy · turn 2", "again"),
        ("observation tool error", "tool (error) · 3 tokens", "Traceback: boom"),
        ("policy", "policy · turn 3", "the answer is 1"),
    ]
    assert '<pre class="completion">' not in dom  # an episode is shown by its turns, not as one text
    assert "env python_tool" in html.unescape(dom)
    user = _dom(write_report(run, tmp_path / "r.html"), tmp_path, "source=step-1&order=worst")
    assert '<div class="turn observation user"><span class="role">user · 4 tokens</span><pre>are you sure?</pre>' in html.unescape(user)


@pytest.fixture(scope="module")
def episode_run(tiny_llama, tmp_path_factory):
    """One GRPO step of tiny-model episodes in ``Answers``."""
    root = tmp_path_factory.mktemp("episodes")
    config = write_config(
        root / "c.yaml",
        tiny_llama,
        root / "run",
        task={"name": "arithmetic", "train_size": 8, "eval_size": 2},
        rewards=[{"name": "conftest:sevens"}],
        rollout={"env": "test_episode_observe:make_env", "max_turns": 4, "max_episode_tokens": 64},
        train={"steps": 1},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(config)]) == 0
    return root / "run"


def test_a_trained_run_logs_episodes_and_inspect_shows_their_turns(episode_run, capsys):
    rows = read_jsonl(episode_run / "completions.jsonl")
    (metrics,) = read_jsonl(episode_run / "metrics.jsonl")
    episodes = [r["turns"] for r in rows]
    assert {t["role"] for turns in episodes for t in turns} == {"assistant", "tool", "user"}
    assert metrics["episode/turns"] == np.mean([sum(t["role"] == "assistant" for t in turns) for turns in episodes]) > 1
    assert metrics["episode/tool_calls"] == np.mean([sum(t["role"] == "tool" for t in turns) for turns in episodes]) > 0
    assert metrics["episode/tool_errors"] == np.mean([sum("error" in t for t in turns) for turns in episodes]) > 0
    observed = [sum(t.get("tokens", 0) for t in turns) for turns in episodes]
    assert metrics["episode/observation_tokens"] == np.mean(observed) > 0  # the observation mask's count

    lines = cli(capsys, episode_run, "--step", 1).splitlines()
    assert lines.count("   [tool] out:1") == sum(t["content"] == "out:1" for turns in episodes for t in turns) > 0
    assert lines.count("   [tool error] Error: boom") == metrics["episode/tool_errors"] * len(rows)
    assert lines.count("   [user] again?") == sum(t["role"] == "user" for turns in episodes for t in turns) > 0
    assert re.search(r"^episode/turns +\S+  [0-9.]+ -> ", cli(capsys, episode_run), re.MULTILINE)
