"""Nothing lost: a killed run resumes exactly; NaN updates are skipped then stop the run; a hung reward scores 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_config

from rewards.registry import reward
from rlreason.config import load_config
from rlreason.observe.runlog import read_jsonl
from rlreason.training.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


@reward("test_sleeps_forever")
def sleeps_forever(completions, samples):
    time.sleep(3600)
    return [1.0] * len(completions)


def small_config(tmp_path: Path, model: Path, name: str, **sections) -> Path:
    base = {
        "rewards": [{"name": "conftest:char_codes"}],
        "train": {"steps": 3, "learning_rate": 1e-2, "micro_batch_size": 4, "max_bad_steps": 2},
        "run": {"eval_before": False, "save_every": 1},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(tmp_path / f"{name}.yaml", model, tmp_path / name, **base)


def test_nan_gradient_is_skipped_then_training_goes_on(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    trainer = Trainer(load_config(small_config(tmp_path, model, "run")))
    first = next(trainer.model.parameters())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    handle = first.register_hook(lambda grad: grad * float("nan"))
    metrics = trainer.train_step()
    assert metrics["skipped_updates"] == 1.0 and "grad_norm" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    handle.remove()
    metrics = trainer.train_step()
    assert metrics["skipped_updates"] == 0.0 and metrics["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [m["skipped_updates"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1.0, 0.0]


def test_persistent_nan_stops_the_run_and_names_the_last_checkpoint(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    trainer = Trainer(load_config(small_config(tmp_path, model, "run", train={"steps": 6}, run={"save_every": 0})))
    trainer.train_step()
    trainer.save_checkpoint()
    next(trainer.model.parameters()).register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row .* Last good checkpoint: .*step-000001"):
        trainer.train()
    assert [m["skipped_updates"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0.0, 1.0, 1.0]


def test_hanging_reward_scores_zero_and_the_run_goes_on(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    config = small_config(
        tmp_path, model, "run", rewards=[{"name": "conftest:char_codes"}, {"name": "test_sleeps_forever"}],
        train={"steps": 2}, run={"reward_timeout": 0.5, "save_every": 0},
    )
    start = time.perf_counter()
    Trainer(load_config(config)).train()
    assert time.perf_counter() - start < 120  # a hung reward costs its timeout, not the hour it sleeps
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["reward_failures"] for m in metrics] == [8, 8]  # P x G completions each step
    assert all(m["rewards/test_sleeps_forever"] == 0.0 for m in metrics)
    completions = read_jsonl(tmp_path / "run" / "completions.jsonl")
    assert len(completions) == 16 and all(c["rewards"]["test_sleeps_forever"] == 0.0 for c in completions)


def run_cli(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.Popen([sys.executable, "-m", "rlreason", "train", str(config), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path):
    model = make_tiny_model(tmp_path / "model", seed=2)
    sections = {"train": {"steps": 4, "num_iterations": 2}}
    straight = small_config(tmp_path, model, "straight", **sections)
    assert run_cli(straight).wait(timeout=300) == 0

    killed = small_config(tmp_path, model, "killed", **sections)
    process = run_cli(killed)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 300
    while not checkpoint.is_dir() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    logged = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert 2 <= len(logged) < 4

    resumed = run_cli(killed, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]
    a, b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for before, after in zip(a, b, strict=True):
        for key in ("reward", "loss", "grad_norm", "completion_length", "ratio", "lr"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (after["step"], key)
