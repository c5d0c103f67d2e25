"""``rlreason inspect`` on the run directory of a tiny real run; the HTML report in headless Chromium."""

import contextlib
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_config

from rlreason.cli import main
from rlreason.observe.inspect_run import distinct, load_run, select, sparkline
from rlreason.observe.reasoning import Milestones
from rlreason.observe.report import report_data, write_report
from rlreason.observe.runlog import Progress, read_jsonl, step_line


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    """Two GRPO steps with an evaluation after each: base@0, grpo@1, final@2. Returns (run dir, stdout)."""
    root = tmp_path_factory.mktemp("inspect")
    config = write_config(
        root / "c.yaml",
        tiny_llama,
        root / "run",
        task={"name": "arithmetic", "train_size": 16, "eval_size": 4},
        rewards=[{"name": "math_accuracy"}, {"name": "conftest:sevens"}],
        run={"eval_every": 1, "log_every": 1, "milestones": {"completion_length": 1.0}},
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", str(config)]) == 0
    return root / "run", out.getvalue()


def cli(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["inspect", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_the_run_logs_what_inspect_reads(tiny_run):
    run_dir, stdout = tiny_run
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    for key in (
        "accuracy/arithmetic", "completion_length_p90", "completion_length_max", "truncated_fraction", "think_length",
        "answer_length", "reasoning/reflections_per_1k", "reasoning/format_adherence", "reasoning/answer_changes",
        "zero_std_groups", "time_generate", "time_score", "time_optimize",
    ):
        assert key in metrics[0], key
    assert {c["task"] for c in read_jsonl(run_dir / "completions.jsonl")} == {"arithmetic"}
    assert [f"{e['stage']}@{e['step']}" for e in read_jsonl(run_dir / "evals.jsonl")] == ["base@0", "grpo@1", "final@2"]
    assert "step 1/2 | reward" in stdout and "step 2/2 | reward" in stdout
    assert "milestone: completion_length reached 1 at step 1" in stdout


def test_progress_bar_shows_eta_and_summary_lines(capsys):
    progress = Progress(4, 0, show_bar=True, log_every=2, milestones=Milestones({"accuracy": 0.5}))
    for step, accuracy in ((1, 0.25), (2, 0.75)):
        progress.update({"step": step, "reward": 1.5, "accuracy": accuracy, "tokens_per_s": 99.0, "kl": float("nan")})
    progress.close()
    captured = capsys.readouterr()
    assert "ETA" in captured.err and "reward=1.500" in captured.err and "tok_s=99" in captured.err
    assert captured.out.splitlines() == [
        "step 2/4 | reward 1.500 | acc 0.75 | 99 tok/s",  # step 1 is not a multiple of log_every; NaN is left out
        "milestone: accuracy reached 0.5 at step 2 (0.75)",
    ]
    assert step_line({"step": 3, "truncated_fraction": 0.25, "time_step": 2.0}, 9) == "step 3/9 | trunc 25% | 2.0 s/step"


def test_summary_shows_curves_evals_and_milestones(tiny_run, capsys):
    out = cli(capsys, tiny_run[0])
    assert re.search(r"^reward +[▁-█]{2} ", out, re.MULTILINE)
    for name in ("accuracy/arithmetic", "completion_length_p90", "think_length", "reasoning/reflections_per_1k", "zero_std_groups"):
        assert re.search(rf"^{re.escape(name)} +[▁-█]{{2}} ", out, re.MULTILINE), name
    assert re.search(r"held-out accuracy \(greedy\) +base@0 [0-9.]+ +grpo@1 [0-9.]+ +final@2", out)
    assert "milestone completion_length >= 1: step 1" in out
    assert sparkline([0, 1, 2, 3]) == "▁▃▆█" and sparkline([5, 5]) == "▁▁" and len(sparkline(list(range(100)), 10)) == 10


def test_step_prints_every_completion_with_rewards_and_advantages(tiny_run, capsys):
    out = cli(capsys, tiny_run[0], "--step", 2)
    rows = [r for r in read_jsonl(tiny_run[0] / "completions.jsonl") if r["step"] == 2]
    assert out.startswith(f"step 2: {len(rows)} completions shown")
    assert out.count("── step 2") == 2  # one header per prompt group
    for row in rows:
        assert f"total {row['total']:+.3f}  advantage {row['advantage']:+.3f}  length {row['length']}" in out
    assert "no completions logged at step 99; steps logged: 1..2" in cli(capsys, tiny_run[0], "--step", 99)


def _run_cli_err(capsys, *args) -> str:
    capsys.readouterr()
    main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_best_and_worst_rank_by_total_reward(tiny_run, capsys):
    run = load_run(tiny_run[0])
    totals = sorted((r["total"] for r in distinct(list(run.completions()))), reverse=True)
    assert [r["total"] for r in select(run, order="best", limit=3)] == totals[:3]
    assert [r["total"] for r in select(run, order="worst", limit=2)] == sorted(totals)[:2]
    out = cli(capsys, tiny_run[0], "--worst", 2)
    assert out.count("total ") == 2
    out = cli(capsys, tiny_run[0], "--step", 1, "--best")
    assert out.count("total ") == 5


def test_grep_counts_matches_per_step(tiny_run, capsys):
    rows = read_jsonl(tiny_run[0] / "completions.jsonl")
    letter = max("aeiost", key=lambda c: sum(c in r["completion"].lower() for r in rows))
    hits = [r for r in rows if letter in r["completion"].lower()]
    out = cli(capsys, tiny_run[0], "--grep", letter, "--limit", 1)
    assert out.startswith(f"/{letter}/ matches {len(hits)} of {len(rows)} completions")
    assert "share per step" in out
    if hits:  # the latest match is printed
        assert out.count("total ") == 1 and f"── step {hits[-1]['step']}" in out
    assert "no completions match" not in cli(capsys, tiny_run[0], "--grep", ".", "--step", 1)


def test_diff_compares_the_same_eval_prompts(tiny_run, capsys):
    out = cli(capsys, tiny_run[0], "--diff", "base", "final")
    assert out.startswith("base@0 -> final@2: accuracy")
    counts = re.findall(r"(?:improved|worsened|changed, same score|unchanged) (\d+)", out)
    assert sum(map(int, counts)) == 4  # every eval prompt, once
    assert cli(capsys, tiny_run[0], "--diff", "0", "grpo@1").startswith("base@0 -> grpo@1")
    assert "no evaluation 'sft'" in _run_cli_err(capsys, tiny_run[0], "--diff", "sft", "final")
    assert "not a run directory" in _run_cli_err(capsys, tiny_run[0] / "nope")


def _handmade_run(path: Path) -> Path:
    """A run directory written by hand, to check the diff's categories and the report's escaping."""
    path.mkdir()
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    nasty = "</script><script>document.title='pwned'</script><!-- 7"
    row = {"step": 1, "prompt": "p", "answer": "7", "completion": nasty, "rewards": {"acc": 1.0}, "total": 1.0, "advantage": 0.0, "length": 3}
    (path / "completions.jsonl").write_text(json.dumps(row) + "\n")
    sample = lambda prompt, text, score: {"prompt": prompt, "answer": "1", "completion": text, "rewards": {"acc": score}}  # noqa: E731
    evals = [
        {"step": 0, "stage": "base", "accuracy": 0.25, "samples": [sample("a", "1", 1.0), sample("b", "2", 0.0), sample("c", "3", 0.0), sample("d", "5", 0.0)]},
        {"step": 9, "stage": "final", "accuracy": 0.25, "samples": [sample("a", "2", 0.0), sample("b", "1", 1.0), sample("c", "4", 0.0), sample("d", "5", 0.0)]},
    ]
    (path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return path


def test_best_shows_each_distinct_completion_once(tmp_path, capsys):
    run_dir = _handmade_run(tmp_path / "run")
    row = {"step": 1, "prompt": "q", "answer": "7", "rewards": {"acc": 1.0}, "total": 1.0, "advantage": 0.5, "length": 3}
    collapsed = [{**row, "completion": "<answer>7</answer>"}] * 4  # a group that collapsed onto one answer
    others = [{**row, "completion": f"<answer>{n}</answer>", "total": 0.1 * n, "advantage": -0.5} for n in range(1, 5)]
    (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in collapsed + others))
    out = cli(capsys, run_dir, "--step", 1, "--best")
    assert out.count("<answer>7</answer>") == 1 and "(4 identical)" in out
    assert out.count("total ") == 5 and all(f"<answer>{n}</answer>" in out for n in range(1, 5))


def test_html_report_names_metrics_that_were_always_zero_instead_of_plotting_them(tmp_path):
    run_dir = _handmade_run(tmp_path / "run")
    rows = [{"step": s, "reward": 0.1 * s, "clip_fraction": 0.0, "kl": 0.0, "entropy": 1.0} for s in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(run_dir)
    data = report_data(run)
    assert data["always_zero"] == ["kl", "clip_fraction"]
    assert [p["title"] for p in data["plots"]] == ["Reward", "Accuracy (first reward)", "Entropy"]
    assert '<p id="always-zero">' in write_report(run, tmp_path / "r.html").read_text()


def test_diff_sorts_prompts_into_improved_worsened_and_changed(tmp_path, capsys):
    out = cli(capsys, _handmade_run(tmp_path / "run"), "--diff", "base", "final")
    assert "improved 1   worsened 1   changed, same score 1   unchanged 1" in out
    assert "── improved (1)\nb   (answer 1)\n   base@0   score 0.00  final answer '2'" in out


def test_html_report_is_self_contained_and_escapes_completions(tmp_path):
    run = load_run(_handmade_run(tmp_path / "run"))
    page = write_report(run, tmp_path / "r.html").read_text()
    assert page.count("</script>") == 2  # the completion's "</script>" cannot end the data block
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"<(?:link|img|iframe)\b|\bsrc=", page)


def _chromium() -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "needs Debian's chromium, which `make test` installs"
    return browser


def test_html_report_renders_plots_and_shows_a_sample_in_chromium(tiny_run, tmp_path):
    run = load_run(tiny_run[0])
    report = write_report(run, tmp_path / "report.html")
    step1 = [r for r in run.completions() if r["step"] == 1]
    threshold = sorted(r["total"] for r in step1)[len(step1) // 2]
    dom = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
            f"{report.as_uri()}#source=step-1&min={threshold}&order=best",
        ],
        capture_output=True, timeout=60, check=True,
    ).stdout.decode()

    data = report_data(run)
    plots = data["plots"]
    assert dom.count('<svg class="plot"') == len(plots) >= 8
    assert data["always_zero"] and f"always 0: {', '.join(data['always_zero'])}" in html.unescape(dom)
    lines = re.findall(r'<path class="line" d="(M[^"]+)"', dom)
    assert len(lines) == sum(not s.get("dots") for p in plots for s in p["series"])
    assert dom.count('<circle class="dot"') == len(run.evals)  # held-out accuracy at each evaluation

    assert dom.count('<li class="sample') == sum(r["total"] >= threshold for r in step1)  # the reward filter
    shown = html.unescape(re.search(r'<pre class="completion">(.*?)</pre>', dom, re.DOTALL)[1])
    best = max(r["total"] for r in step1)
    squash = lambda text: "".join(text.split())  # noqa: E731
    assert squash(shown) in {squash(r["completion"]) for r in step1 if r["total"] == best}
