"""The run directory's logs: ``metrics.jsonl`` (a line per step), ``completions.jsonl`` (every completion),
``evals.jsonl`` (held-out evaluations), optionally mirrored to wandb.

Every line is written and flushed whole, so after a crash each file is still valid JSONL up to the last step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
COMPLETIONS = "completions.jsonl"
EVALS = "evals.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSONL file (a torn last line from a crash is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after ``step``: on resume they are recomputed, and must not appear twice."""
    rows = [r for r in read_jsonl(path) if r.get("step", -1) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


class RunLog:
    """Appends to the run's JSONL files; the main process is the only writer under several processes."""

    def __init__(self, run_dir: Path, enabled: bool = True, report_to: list[str] | None = None, config: dict | None = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.wandb = self._start_wandb(config) if enabled and "wandb" in (report_to or []) else None

    def _start_wandb(self, config: dict | None) -> Any:
        try:
            import wandb

            return wandb.init(project="rlreason", dir=str(self.run_dir), config=config, name=self.run_dir.name)
        except Exception as exc:  # tracking is optional: the JSONL logs are the record
            log.warning("wandb disabled: %s", exc)
            return None

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.run_dir / name, "a") as f:
            f.write("".join(json.dumps(_clean(r)) + "\n" for r in rows))
            f.flush()

    def metrics(self, row: dict[str, Any]) -> None:
        self._append(METRICS, [row])
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def completions(self, rows: list[dict[str, Any]]) -> None:
        self._append(COMPLETIONS, rows)

    def evaluation(self, row: dict[str, Any]) -> None:
        self._append(EVALS, [row])
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
