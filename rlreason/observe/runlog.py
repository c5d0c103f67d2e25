"""The run directory's logs: ``metrics.jsonl`` (a line per step), ``completions.jsonl`` (every completion),
``evals.jsonl`` (held-out evaluations), optionally mirrored to wandb; and the terminal view of a run.

Every line is written and flushed whole, so after a crash each file is still valid JSONL up to the last step.
wandb is a mirror, never the record: if it is missing or fails (at start or mid-run) it is switched off with
a warning and training goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlreason.observe.reasoning import Milestones

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
EVALS = "evals.jsonl"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
CHECKPOINT_DIR = "checkpoints"
SFT_MODEL_DIR = "sft-model"
"""Where ``rlreason sft`` saves the fine-tuned model inside its run directory."""
EVAL_REPORT = "eval-reports"
"""Where ``rlreason eval`` keeps its reports, one new file per evaluation (``rlreason.observe.evaluate.report_path``)."""
WANDB_DIR = "wandb"

RUN_OUTPUTS = (CONFIG, METRICS, COMPLETIONS, EVALS, SUMMARY, CHECKPOINT_DIR, SFT_MODEL_DIR, EVAL_REPORT, WANDB_DIR)
"""Everything a run (train, sft, eval of it) writes in its directory: any of them means the directory holds a run, and
an overwrite deletes these and nothing else. Data written there on purpose (``rlreason sample``'s samples.jsonl, a
report at a path of one's choosing) is not a run output."""
LOGS = (METRICS, COMPLETIONS, EVALS, SUMMARY)
"""The outputs that record what the run did, step by step."""


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The complete lines of a JSONL file one at a time (a torn last line from a crash is ignored), so a
    completions log larger than memory can still be searched."""
    if not path.is_file():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSONL file (a torn last line from a crash is ignored)."""
    return list(iter_jsonl(path))


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step``: on resume they are recomputed, and must not appear twice."""
    rows = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; ``.tmp`` directories of interrupted saves never match."""
    candidates = [p for p in (run_dir / CHECKPOINT_DIR).glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name)]
    return max(candidates, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: Path | None) -> int | None:
    """The training step a checkpoint directory (``step-000012``) was saved at."""
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else None


def restart_logs(run_dir: Path) -> None:
    """Delete the logs of an attempt that never reached a checkpoint: starting over rewrites them, and each step
    must appear once."""
    for name in LOGS:
        (run_dir / name).unlink(missing_ok=True)


def _numbers(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The row's numbers for wandb; "step" is wandb's own step, not a metric."""
    return {prefix + k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def spread(rows: list[Any], k: int) -> list[Any]:
    """``k`` rows evenly spaced over the batch: every group is represented, and no random state is touched
    (a resumed run must draw the same numbers as an uninterrupted one)."""
    if k <= 0 or not rows:
        return []
    stride = max(1, len(rows) // k)
    return rows[::stride][:k]


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


class RunLog:
    """Appends to the run's JSONL files; the main process is the only writer under several processes."""

    def __init__(self, run_dir: Path, enabled: bool = True, report_to: list[str] | None = None, config: dict | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        run = (config or {}).get("run", {})
        self.table_rows = int(run.get("wandb_completions", 8))
        self.wandb: Any = None
        if enabled and "wandb" in (report_to or []):
            self._start_wandb(config, run.get("wandb_project", "rlreason"))

    def _start_wandb(self, config: dict | None, project: str) -> None:
        try:
            import wandb

            self.wandb = wandb.init(project=project, dir=str(self.run_dir), config=config, name=self.run_dir.name)
            self._table = wandb.Table
        except Exception as exc:  # tracking is optional: the JSONL logs are the record
            log.warning("wandb disabled: %s", exc)

    @contextlib.contextmanager
    def _wandb_guard(self) -> Iterator[None]:
        """Runs a wandb call; one that raises switches wandb off for the rest of the run instead of ending it."""
        try:
            yield
        except Exception as exc:
            log.warning("wandb disabled after an error: %s", exc)
            self.wandb = None

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / name, "a") as f:
            f.write("".join(json.dumps(_clean(r)) + "\n" for r in rows))
            f.flush()

    def metrics(self, row: dict[str, Any]) -> None:
        self._append(METRICS, [row])
        if self.wandb is not None:
            with self._wandb_guard():
                self.wandb.log(_numbers(row), step=row["step"])

    def completions(self, rows: list[dict[str, Any]]) -> None:
        """Every completion to completions.jsonl; an even spread of them to wandb as the step's table."""
        self._append(COMPLETIONS, rows)
        chosen = spread(rows, self.table_rows) if self.wandb is not None else []
        if not chosen:
            return
        names = list(chosen[0].get("rewards", {}))
        columns = ["step", "task", "prompt", "completion", "answer", "total", "advantage", "length", *names]
        data = [
            [r["step"], _text(r.get("task")), r["prompt"], r["completion"], _text(r.get("answer")), r["total"],
             r["advantage"], r["length"], *(r["rewards"].get(n) for n in names)]
            for r in chosen
        ]
        with self._wandb_guard():
            self.wandb.log({"completions": self._table(columns=columns, data=data)}, step=chosen[0]["step"])

    def evaluation(self, row: dict[str, Any]) -> None:
        """The evaluation to evals.jsonl; its accuracy, reward means and samples (as a table) to wandb."""
        self._append(EVALS, [row])
        if self.wandb is None:
            return
        with self._wandb_guard():
            payload = {**_numbers(row, "eval/"), **_numbers(row.get("rewards", {}), "eval/rewards/")}
            samples = row.get("samples", [])
            if samples:
                names = list(samples[0].get("rewards", {}))
                payload["eval/samples"] = self._table(
                    columns=["stage", "prompt", "completion", "answer", *names],
                    data=[[row["stage"], s["prompt"], s["completion"], _text(s.get("answer")), *(s["rewards"].get(n) for n in names)] for s in samples],
                )
            self.wandb.log(payload, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            with self._wandb_guard():
                self.wandb.finish()
            self.wandb = None


_LINE = [  # (metric, template): the one-line summary, in reading order; absent metrics are skipped
    ("reward", "reward {:.3f}"),
    ("accuracy", "acc {:.2f}"),
    ("completion_length", "len {:.0f}"),
    ("completion_length_p90", "p90 {:.0f}"),
    ("truncated_fraction", "trunc {:.0%}"),
    ("think_length", "think {:.0f}"),
    ("answer_length", "answer {:.0f}"),
    ("reasoning/reflections_per_1k", "reflect {:.2f}/1k"),
    ("reasoning/format_adherence", "format {:.2f}"),
    ("reasoning/answer_changes", "changes {:.2f}"),
    ("zero_std_groups", "flat {:.0%}"),
    ("kl", "kl {:.4f}"),
    ("entropy", "ent {:.3f}"),
    ("clip_fraction", "clip {:.3f}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("time_step", "{:.1f} s/step"),
]


def step_line(metrics: dict[str, Any], total: int) -> str:
    """One line that says how a step went, e.g. ``step 12/200 | reward 0.512 | acc 0.44 | len 87 | ...``;
    ``flat`` is the share of groups whose rewards are all equal (they teach nothing)."""
    parts = [f"step {metrics['step']}/{total}"]
    for key, template in _LINE:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(template.format(value))
    return " | ".join(parts)


class Progress:
    """The terminal during training: a bar with step, reward, accuracy, tokens/s and ETA; a summary line every
    ``log_every`` steps; and a line the first time a milestone metric reaches its threshold."""

    def __init__(self, total: int, initial: int, show_bar: bool, log_every: int, milestones: Milestones, enabled: bool = True):
        self.total = total
        self.log_every = log_every
        self.milestones = milestones
        self.enabled = enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="grpo",
            disable=not (show_bar and enabled),
            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} ETA{postfix}",
        )

    def update(self, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
        )
        news = self.milestones.update(metrics)
        if not self.enabled:
            return
        if self.log_every and metrics["step"] % self.log_every == 0:
            tqdm.write(step_line(metrics, self.total))
        for message in news:
            tqdm.write(f"milestone: {message}")

    def close(self) -> None:
        self.bar.close()
