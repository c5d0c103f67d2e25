"""wandb as a metric sink: an offline run writes metrics and completion tables; a missing or failing wandb
is a warning, never a crash."""

import json
import logging
import struct
import sys
import time
import types
from pathlib import Path

from conftest import write_config

from rlreason.cli import main
from rlreason.observe.runlog import RunLog, read_jsonl


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(wandb_internal_pb2.Record.FromString(chunk))
            chunk = b""
    return records


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The records once the log holds the run's exit record: wandb's service finishes writing the file a
    moment after ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    records = wandb_records(path)
    while not any(r.HasField("exit") for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = wandb_records(path)
    return records


def test_offline_run_writes_metrics_and_completion_tables(tiny_llama, tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml",
        tiny_llama,
        run_dir,
        task={"name": "arithmetic", "train_size": 8, "eval_size": 2},
        train={"steps": 1, "micro_batch_size": 4},
        run={"report_to": ["wandb"], "wandb_completions": 3},
    )
    assert main(["train", str(config)]) == 0

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (log_file,) = offline.glob("run-*.wandb")
    records = finished_records(log_file)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item} for r in records if r.HasField("history")]
    logged = {key for row in history for key in row}
    step = read_jsonl(run_dir / "metrics.jsonl")[0]
    for key in ("reward", "accuracy", "reasoning/reflections_per_1k", "completion_length_p90", "eval/accuracy", "eval/samples/path"):
        assert key in logged, key
    assert "step" not in logged and "eval/step" not in logged  # wandb's own _step says it
    assert any(row.get("reward") == step["reward"] and row.get("_step") == 1 for row in history)
    (run_record,) = [r.run for r in records if r.HasField("run")]
    assert "rollout" in {item.key for item in run_record.config.update}

    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in (offline / "files" / "media" / "table").rglob("*.table.json")}
    completions = tables["completions"]
    assert completions["columns"][:4] == ["step", "task", "prompt", "completion"] and len(completions["data"]) == 3
    assert (offline / "files" / "media" / "table" / "eval").is_dir()  # eval/samples tables, one per evaluation


def test_missing_wandb_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING):
        runlog = RunLog(tmp_path, report_to=["wandb"])
    assert runlog.wandb is None and "wandb disabled" in caplog.text
    runlog.metrics({"step": 1, "reward": 1.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 1.0}]


def test_wandb_failing_at_start_or_mid_run_is_a_warning(tmp_path, monkeypatch, caplog):
    def refuse(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse))
    with caplog.at_level(logging.WARNING):
        assert RunLog(tmp_path, report_to=["wandb"]).wandb is None
    assert "wandb disabled: no network" in caplog.text

    class Broken:
        def log(self, *args, **kwargs):
            raise OSError("wandb service died")

    runlog = RunLog(tmp_path)
    runlog.wandb = Broken()
    with caplog.at_level(logging.WARNING):
        runlog.metrics({"step": 1, "reward": 1.0})
        runlog.metrics({"step": 2, "reward": 2.0})
        runlog.close()
    assert caplog.text.count("wandb disabled after an error: wandb service died") == 1
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
