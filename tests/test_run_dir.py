"""The run directory: what an overwrite may delete, what counts as a run, and resume that reads as if the run had never
stopped (before its first checkpoint, after one, after the end)."""

import json
from pathlib import Path

from conftest import write_config

from rlreason.cli import main
from rlreason.config import load_config
from rlreason.observe.runlog import read_jsonl
from rlreason.training.trainer import Trainer


def traces(path: Path, n: int = 4) -> Path:
    """A chat JSONL the cold start can train on."""
    line = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>1+1</think> 2"}]}
    path.write_text("".join(json.dumps(line) + "\n" for _ in range(n)))
    return path


def config(tmp_path: Path, model: Path, run_dir: Path, name: str = "c", **sections) -> Path:
    base = {"rewards": [{"name": "conftest:char_codes"}], "train": {"steps": 2}, "run": {"eval_before": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_config(tmp_path / f"{name}.yaml", model, run_dir, **base)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_overwrite_replaces_the_run_and_keeps_everything_else(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = config(tmp_path, tiny_llama, run_dir, train={"steps": 1})
    assert main(["train", str(path)]) == 0
    notes, data = run_dir / "notes.txt", traces(run_dir / "traces.jsonl")
    notes.write_text("the user's own file")
    again = config(tmp_path, tiny_llama, run_dir, "again", train={"steps": 2}, sft={"data": str(data), "steps": 1, "batch_size": 2},
                   run={"overwrite": True})
    assert main(["train", str(again)]) == 0, capsys.readouterr().err
    assert notes.read_text() == "the user's own file" and data.is_file()
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [e["stage"] for e in read_jsonl(run_dir / "evals.jsonl")] == ["sft", "final"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]


def test_overwrite_refuses_to_delete_an_input_of_the_run(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(config(tmp_path, tiny_llama, run_dir, train={"steps": 1}))]) == 0
    before = snapshot(run_dir)
    model = run_dir / "checkpoints" / "step-000001" / "model"
    path = config(tmp_path, model, run_dir, "from-checkpoint", run={"overwrite": True})
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run.overwrite=true would delete") and "model.name" in err and "\n" not in err
    assert snapshot(run_dir) == before


def test_a_directory_left_by_a_run_killed_during_sft_holds_a_run(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train: {steps: 9}\n")
    (run_dir / "evals.jsonl").write_text(json.dumps({"step": 0, "stage": "base", "accuracy": 0.5}) + "\n")
    before = snapshot(run_dir)
    assert main(["train", str(config(tmp_path, tiny_llama, run_dir))]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_resume_before_the_first_checkpoint_restarts_the_logs(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = config(tmp_path, tiny_llama, run_dir, train={"steps": 4}, run={"eval_before": True})
    killed = Trainer(load_config(path))  # what kill -9 at step 2 of a run without checkpoints leaves
    killed.evaluate("base")
    killed.train_step()
    killed.train_step()
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [e["stage"] for e in read_jsonl(run_dir / "evals.jsonl")] == ["base", "final"]
    assert [c["step"] for c in read_jsonl(run_dir / "completions.jsonl")] == [s for s in (1, 2, 3, 4) for _ in range(8)]


def test_resume_names_the_checkpoint_and_step(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = config(tmp_path, tiny_llama, run_dir, train={"steps": 3}, run={"save_every": 1})
    Trainer(load_config(path, ["train.steps=1"])).train()
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 0
    checkpoint = run_dir / "checkpoints" / "step-000001"
    assert f"resuming from {checkpoint} (step 1 of 3)" in capsys.readouterr().err
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_resume_of_a_finished_run_only_says_so(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = config(tmp_path, tiny_llama, run_dir, train={"steps": 1})
    assert main(["train", str(path)]) == 0
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 0
    assert "is finished" in capsys.readouterr().err
    assert snapshot(run_dir) == before
