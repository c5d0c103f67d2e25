"""Sampled evaluation: pass@k and maj@k computed from scored samples, and `rlreason eval`."""

import json

import numpy as np
import pytest
from conftest import write_config

from rlreason.cli import main
from rlreason.observe.evaluate import sampled_metrics
from rlreason.scoring import Scores


def test_sampled_metrics_by_hand():
    # two prompts, n = 3; first reward = correctness, total adds a format bonus
    texts = ["<answer>4</answer>", "<answer>5</answer>", "<answer>5</answer>",
             "<answer>7</answer>", "<answer>8</answer>", "<answer>9</answer>"]
    correct = np.array([[1.0], [0.0], [0.0], [0.0], [0.0], [1.0]])
    metrics = sampled_metrics(texts, Scores(["acc"], correct, correct[:, 0]), n=3, ks=[1, 3])
    # prompt 1: c=1 of 3 -> pass@1 = 1/3, pass@3 = 1; prompt 2 the same
    assert metrics["pass@1"] == pytest.approx(1 / 3)
    assert metrics["pass@3"] == pytest.approx(1.0)
    # maj@3: prompt 1 majority "5" (wrong) -> 0; prompt 2 a three-way tie split evenly -> 1/3
    assert metrics["maj@3"] == pytest.approx(1 / 6)
    # maj@1 averages every single sample, as pass@1 does
    assert metrics["maj@1"] == pytest.approx(1 / 3)
    assert not any(name.startswith("best_of") for name in metrics)  # choosing with the gold answer is no method


def test_eval_command_on_a_run_directory(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_llama, run_dir, train={"steps": 1}, run={"eval_before": False})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "eval.samples=4", "eval.k=[1,2,4]", "task.eval_size=4"]) == 0
    out = capsys.readouterr().out
    for name in ("accuracy (greedy)", "pass@1", "pass@4", "maj@2"):
        assert name in out
    (path,) = (run_dir / "eval-reports").glob("eval-step-000001-*.json")
    report = json.loads(path.read_text())
    assert report["model"].endswith("step-000001/model") and report["num_prompts"] == 4 and report["step"] == 1
    assert 0.0 <= report["pass@1"] <= report["pass@2"] <= report["pass@4"] <= 1.0


def test_eval_k_larger_than_samples_is_a_config_error(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run")
    assert main(["eval", str(config), "eval.samples=2", "eval.k=[4]"]) == 2
    assert "eval.k: every k must be between 1 and eval.samples = 2" in capsys.readouterr().err
