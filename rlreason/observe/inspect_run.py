"""Read a run directory back: curves as sparklines, completions of a step, the best and worst, a search, and how
greedy answers to the held-out prompts changed between two evaluations.

An episode (a completion with ``turns``) is printed turn by turn: the policy's turns indented as any completion
is, every line the environment wrote behind its role (``[tool]``, ``[tool error]``, ``[user]``), so an
observation never reads as the policy's own text.

Everything here reads the run's JSONL files (never a model), so it works on a run in progress or on a copy
of one; ``completions.jsonl`` is streamed, so it may be larger than memory. (Named ``inspect_run`` rather
than ``inspect`` so that running a file of this package as a script cannot shadow the standard library's
``inspect``.) The HTML report is in ``rlreason.observe.report``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rewards.extract import final_answer
from rlreason.config import MILESTONES
from rlreason.observe.reasoning import first_crossings
from rlreason.observe.runlog import COMPLETIONS, EVALS, METRICS, iter_jsonl, read_jsonl

CURVES = [
    ("Reward", ["reward", "rewards/*"]),
    ("Accuracy (first reward)", ["accuracy", "accuracy/*"]),
    ("Completion length (tokens)", ["completion_length", "completion_length_p90", "completion_length_max"]),
    ("Think vs answer length (tokens)", ["think_length", "answer_length"]),
    ("Reflection phrases per 1k tokens", ["reasoning/reflections_per_1k"]),
    ("Format adherence", ["reasoning/format_adherence"]),
    ("Answer changes per completion", ["reasoning/answer_changes"]),
    ("Episode turns and tool calls", ["episode/turns", "episode/tool_calls", "episode/tool_errors"]),
    ("Observation tokens per episode", ["episode/observation_tokens"]),
    ("Truncated and zero-variance groups", ["truncated_fraction", "zero_std_groups"]),
    ("KL to reference", ["kl"]),
    ("Entropy", ["entropy"]),
    ("Clipping", ["clip_fraction*"]),
    ("Gradient norm", ["grad_norm"]),
    ("Time per phase (s)", ["time_generate", "time_score", "time_optimize", "time_*"]),
    ("Throughput (tokens/s)", ["tokens_per_s"]),
]
"""(title, metric patterns): the curves the summary and the HTML report show, in that order, when logged."""

_SPARKS = "▁▂▃▄▅▆▇█"


@dataclass
class Run:
    """A run directory's config, metrics and evaluations (completions are streamed on demand)."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def completions(self) -> Iterator[dict[str, Any]]:
        return iter_jsonl(self.path / COMPLETIONS)

    def milestones(self) -> dict[str, int | None]:
        thresholds = self.config.get("run", {}).get("milestones", MILESTONES)
        return first_crossings(self.metrics, thresholds)

    def curve(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of one metric, skipping steps where it is missing or not finite."""
        return [(m["step"], float(v)) for m in self.metrics if _finite(v := m.get(name))]

    def curve_names(self, patterns: list[str]) -> list[str]:
        """The logged metrics matching ``patterns``, in pattern order, each once."""
        logged = list(dict.fromkeys(k for m in self.metrics for k in m))
        names: list[str] = []
        for pattern in patterns:
            names += [k for k in logged if fnmatch.fnmatchcase(k, pattern) and k not in names]
        return [n for n in names if self.curve(n)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(path: str | Path) -> Run:
    """The run in ``path``; a directory without metrics.jsonl is not a run and raises FileNotFoundError."""
    path = Path(path)
    if not (path / METRICS).is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no {METRICS})")
    config_file = path / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return Run(path, config or {}, read_jsonl(path / METRICS), read_jsonl(path / EVALS))


def sparkline(values: list[float], width: int = 40) -> str:
    """``values`` as block characters, averaged into at most ``width`` buckets; flat data is a flat line."""
    if not values:
        return ""
    buckets = min(width, len(values))
    means = []
    for i in range(buckets):
        chunk = values[i * len(values) // buckets : (i + 1) * len(values) // buckets]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    if high == low:
        return _SPARKS[0] * buckets
    return "".join(_SPARKS[round((v - low) / (high - low) * (len(_SPARKS) - 1))] for v in means)


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def summary(run: Run, width: int = 40) -> str:
    """The run at a glance: what was trained, every curve as a sparkline, evaluations and milestones."""
    cfg = run.config
    model, task, rollout = cfg.get("model", {}), cfg.get("task", {}), cfg.get("rollout", {})
    last = run.metrics[-1]["step"] if run.metrics else 0
    total = cfg.get("train", {}).get("steps", "?")
    rewards = ", ".join(f"{r['name']} x{r.get('weight', 1.0):g}" for r in cfg.get("rewards", []))
    lines = [
        f"run       {run.path}",
        f"model     {model.get('name', '?')}   task {task.get('name', '?')}   rewards {rewards or '?'}",
        f"steps     {last}/{total}   {rollout.get('prompts_per_step', '?')} prompts x {rollout.get('group_size', '?')} completions per step",
    ]
    if rollout.get("env"):
        lines.append(f"episodes  env {rollout['env']}   up to {rollout.get('max_turns', '?')} turns each")
    lines.append("")
    names = [n for _, patterns in CURVES for n in run.curve_names(patterns)]
    pad = max((len(n) for n in names), default=0)
    spark = min(width, len(run.metrics))
    for name in names:
        values = [v for _, v in run.curve(name)]
        lines.append(
            f"{name:<{pad}}  {sparkline(values, width):<{spark}}  {_number(values[0])} -> {_number(values[-1])}"
            f"  (min {_number(min(values))}, max {_number(max(values))})"
        )
    if run.evals:
        lines += ["", "held-out accuracy (greedy)  " + "  ".join(f"{e['stage']}@{e['step']} {_accuracy(e)}" for e in run.evals)]
    reached = run.milestones()
    if reached:
        thresholds = cfg.get("run", {}).get("milestones", MILESTONES)
        lines.append("")
        lines += [
            f"milestone {name} >= {thresholds[name]:g}: " + (f"step {step}" if step is not None else "not reached")
            for name, step in reached.items()
        ]
    return "\n".join(lines)


def select(
    run: Run, step: int | None = None, pattern: str | None = None, order: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Completions of ``step`` (all steps if None) matching ``pattern`` (a case-insensitive regex), ordered
    ``"best"``/``"worst"`` by total reward or as logged, the first ``limit`` of them. Ranked, each distinct
    completion of a prompt is listed once (``distinct``): a group that collapsed onto one answer would otherwise
    fill the top K with copies."""
    regex = re.compile(pattern, re.IGNORECASE) if pattern else None
    rows = [
        r for r in run.completions()
        if (step is None or r["step"] == step) and (regex is None or regex.search(r["completion"]))
    ]
    if order in ("best", "worst"):
        rows = distinct(rows)
        rows.sort(key=lambda r: r["total"] if _finite(r["total"]) else -math.inf, reverse=order == "best")
    return rows[:limit] if limit is not None else rows


def distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of each (prompt, completion), in order, with ``copies``: how many rows had it."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["prompt"], row["completion"])
        if key in first:
            first[key]["copies"] += 1
        else:
            first[key] = {**row, "copies": 1}
    return list(first.values())


def _accuracy(evaluation: dict[str, Any]) -> str:
    """An evaluation's accuracy, or "n/a" where its verifier failed (None: no score to show)."""
    return "n/a" if evaluation["accuracy"] is None else f"{evaluation['accuracy']:.3f}"


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in (text.splitlines() or [""]))


def _tag(turn: dict[str, Any]) -> str:
    return f"[{turn['role']}{' error' if turn.get('error') else ''}]"


def format_turns(turns: list[dict[str, Any]]) -> str:
    """An episode turn by turn, observations marked by their role (see the module docstring)."""
    return "\n".join(
        _indent(turn["content"]) if turn["role"] == "assistant" else _indent(turn["content"], f"   {_tag(turn)} ")
        for turn in turns
    )


def _episode_counts(turns: list[dict[str, Any]]) -> str:
    tools = [t for t in turns if t["role"] == "tool"]
    errors = sum(bool(t.get("error")) for t in tools)
    observed = sum(t.get("tokens", 0) for t in turns if t["role"] != "assistant")
    return (
        f"  {sum(t['role'] == 'assistant' for t in turns)} turns  {len(tools)} tool calls"
        + (f" ({errors} failed)" if errors else "") + f"  {observed} observation tokens"
    )


def _flat_episode(sample: dict[str, Any]) -> str:
    """A completion on one line; an episode's observations inline behind their role."""
    turns = sample.get("turns")
    if not turns:
        return sample["completion"]
    return " ".join(t["content"] if t["role"] == "assistant" else f"{_tag(t)} {t['content']}" for t in turns)


def format_completions(rows: list[dict[str, Any]]) -> str:
    """Completions with their step, prompt, rewards and advantage (an episode turn by turn, with its counts); a
    prompt is printed once per group."""
    out, previous = [], None
    for row in rows:
        if (row["step"], row["prompt"]) != previous:
            previous = (row["step"], row["prompt"])
            answer = f"   (answer {row['answer']})" if row.get("answer") is not None else ""
            out.append(f"── step {row['step']}  {row.get('task') or ''}  {row['prompt']!r}{answer}")
        rewards = "  ".join(f"{k}={v:.3g}" if _finite(v) else f"{k}=-" for k, v in row["rewards"].items())
        flags = "  truncated" if row.get("truncated") else ""
        if row.get("copies", 1) > 1:
            flags += f"  ({row['copies']} identical)"
        turns = row.get("turns")
        if turns:
            flags += _episode_counts(turns)
        out.append(f"   total {row['total']:+.3f}  advantage {row['advantage']:+.3f}  length {row['length']}{flags}  {rewards}")
        out.append(format_turns(turns) if turns else _indent(row["completion"]))
    return "\n".join(out) if out else "no completions match"


def show_step(run: Run, step: int, order: str | None = None, limit: int | None = None) -> str:
    """That step's completions with rewards and advantages (``--step``)."""
    rows = select(run, step=step, order=order, limit=limit)
    if not rows:
        steps = sorted({m["step"] for m in run.metrics})
        return f"no completions logged at step {step}; steps logged: {steps[0]}..{steps[-1]}" if steps else "no steps logged"
    metrics = next((m for m in run.metrics if m["step"] == step), {})
    head = f"step {step}: {len(rows)} completions shown"
    if "reward" in metrics:
        head += f", mean reward {metrics['reward']:.3f}, accuracy {metrics.get('accuracy', float('nan')):.3f}"
    return head + "\n" + format_completions(rows)


def grep(run: Run, pattern: str, step: int | None = None, order: str | None = None, limit: int = 10) -> str:
    """How often completions match ``pattern`` at each step (a sparkline of the share), then the latest
    ``limit`` matches (or the best/worst of them)."""
    regex = re.compile(pattern, re.IGNORECASE)
    counts: dict[int, list[int]] = {}
    for row in run.completions():
        if step is None or row["step"] == step:
            hits = counts.setdefault(row["step"], [0, 0])
            hits[0] += bool(regex.search(row["completion"]))
            hits[1] += 1
    if not counts:
        return "no completions logged"
    shares = [hit / seen for hit, seen in counts.values()]
    total = sum(h for h, _ in counts.values())
    first = next((s for s, (h, _) in counts.items() if h), None)
    lines = [
        f"/{pattern}/ matches {total} of {sum(n for _, n in counts.values())} completions"
        + (f"; first at step {first}" if first is not None else ""),
        f"share per step  {sparkline(shares)}  {shares[0]:.2f} -> {shares[-1]:.2f}",
    ]
    rows = select(run, step, pattern, order)
    rows = rows[:limit] if order else rows[-limit:]
    if rows:
        lines += ["", format_completions(rows)]
    return "\n".join(lines)


def find_eval(run: Run, key: str) -> dict[str, Any]:
    """An evaluation by step ("20"), stage ("base", "final") or both ("grpo@10"); the last one logged wins."""
    stage: str | None
    if "@" in key:
        stage, step = key.split("@", 1)
    elif key.isdigit():
        stage, step = None, key
    else:
        stage, step = key, ""
    matches = [
        e for e in run.evals
        if (stage is None or e["stage"] == stage) and (not step or e["step"] == int(step))
    ]
    if not matches:
        known = ", ".join(f"{e['stage']}@{e['step']}" for e in run.evals) or "none"
        raise KeyError(f"no evaluation {key!r} in {run.path / EVALS}; evaluations: {known}")
    return matches[-1]


def _score(sample: dict[str, Any]) -> float:
    """The first reward (by convention correctness), the number accuracy is computed from."""
    value = next(iter(sample.get("rewards", {}).values()), None)
    return float(value) if _finite(value) else 0.0


def _oneline(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def diff(run: Run, a: str, b: str, limit: int = 5) -> str:
    """How the greedy answers to the same held-out prompts changed between evaluations ``a`` and ``b``."""
    before, after = find_eval(run, a), find_eval(run, b)
    old = {(s["prompt"], str(s.get("answer"))): s for s in before.get("samples", [])}
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {
        "improved": [], "worsened": [], "changed, same score": [], "unchanged": [],
    }
    for new in after.get("samples", []):
        prev = old.get((new["prompt"], str(new.get("answer"))))
        if prev is None:
            continue
        delta = _score(new) - _score(prev)
        kind = "improved" if delta > 0 else "worsened" if delta < 0 else (
            "unchanged" if prev["completion"] == new["completion"] else "changed, same score"
        )
        groups[kind].append((prev, new))
    name_a, name_b = f"{before['stage']}@{before['step']}", f"{after['stage']}@{after['step']}"
    shared = sum(len(g) for g in groups.values())
    lines = [
        f"{name_a} -> {name_b}: accuracy {_accuracy(before)} -> {_accuracy(after)} on {shared} shared prompts",
        "   ".join(f"{kind} {len(pairs)}" for kind, pairs in groups.items()),
    ]
    pad = max(len(name_a), len(name_b))
    for kind, pairs in groups.items():
        if kind == "unchanged" or not pairs:
            continue
        lines += ["", f"── {kind} ({len(pairs)}{f', first {limit} shown' if len(pairs) > limit else ''})"]
        for prev, new in pairs[:limit]:
            lines.append(f"{_oneline(prev['prompt'], 120)}   (answer {prev.get('answer')})")
            for label, sample in ((name_a, prev), (name_b, new)):
                lines.append(
                    f"   {label:<{pad}}  score {_score(sample):.2f}  final answer {final_answer(sample['completion'])!r}"
                    f"  | {_oneline(_flat_episode(sample))}"
                )
    return "\n".join(lines)
