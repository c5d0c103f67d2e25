"""Two processes through `accelerate launch` (gloo on the CPU) train exactly what one process trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, write_config
from transformers import AutoModelForCausalLM

from rlreason.observe.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TWO_PROCESSES = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"


def launch(config: Path, *extra: str, processes: int) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if processes == 1:
        command = [sys.executable, "-m", "rlreason", "train", str(config), *extra]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_PROCESSES),
                   "-m", "rlreason.train", str(config), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def weights(run_dir: Path, step: int) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / f"step-{step:06d}" / "model")
    return [p.detach() for p in model.parameters()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = make_tiny_model(root / "model", seed=5)

    def config(name: str, reward: str = "conftest:char_codes", **train) -> Path:
        return write_config(
            root / f"{name}.yaml", model, root / name, rewards=[{"name": reward}],
            rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 32},  # long enough to end at different lengths
            train={"steps": 1, "learning_rate": 1e-2, "micro_batch_size": 8, "bf16": "false", "seed": 1, **train},
            run={"eval_before": False, "save_every": 1, "keep_last": 3},
        )

    return root, config


def test_two_processes_match_one_after_a_step(setup):
    root, config = setup
    launch(config("one", num_iterations=2), processes=1)
    stdout = launch(config("two", num_iterations=2), processes=2)
    assert stdout.count('"steps": 1') == 1  # the summary, from the main process only
    one, two = read_jsonl(root / "one" / "metrics.jsonl"), read_jsonl(root / "two" / "metrics.jsonl")
    assert one[0]["processes"] == 1 and two[0]["processes"] == 2
    for key in ("entropy", "ratio", "clip_fraction"):  # means over all tokens, not of each process's mean
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5), key
    assert two[0]["reward"] == one[0]["reward"] and two[0]["rewards/conftest:char_codes"] == one[0]["rewards/conftest:char_codes"]
    completions = [[(c["prompt"], c["completion"], c["total"]) for c in read_jsonl(root / run / "completions.jsonl")] for run in ("one", "two")]
    assert completions[0] == completions[1] and len(completions[0]) == 16
    initial = [p.detach() for p in AutoModelForCausalLM.from_pretrained(root / "model").parameters()]
    w1, w2 = weights(root / "one", 1), weights(root / "two", 1)
    assert max((a - b).abs().max().item() for a, b in zip(w1, w2, strict=True)) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(w1, initial, strict=True)) > 1e-4  # the step did move them


def test_two_process_run_resumes_from_its_checkpoint(setup):
    root, config = setup
    straight = config("straight", steps=2, loss_type="bnpo")
    launch(straight, processes=2)
    resumed = config("resumed", steps=1, loss_type="bnpo")
    launch(resumed, processes=2)
    launch(resumed, "train.steps=2", "--resume", processes=2)
    a, b = read_jsonl(root / "straight" / "metrics.jsonl"), read_jsonl(root / "resumed" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2] and b[1]["processes"] == 2
    for key in ("reward", "loss", "grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-8), key
    diff = max((x - y).abs().max().item() for x, y in zip(weights(root / "straight", 2), weights(root / "resumed", 2), strict=True))
    assert diff < 1e-5
    assert json.loads((root / "resumed" / "summary.json").read_text())["steps"] == 2


def test_a_process_with_nothing_to_train_runs_as_many_passes_as_the_other(setup):
    """train.skip_zero_advantage with every group of process 0 flat and none of process 1's: process 0 still runs one
    micro-batch (one row), so the gradient all-reduce finds both, and the weights are those of the run that trains
    every completion."""
    root, config = setup
    for skip in (True, False):
        launch(config(f"flat-{skip}", "conftest:flat_on_the_first_process", skip_zero_advantage=skip), processes=2)
    skipped, whole = read_jsonl(root / "flat-True" / "metrics.jsonl")[0], read_jsonl(root / "flat-False" / "metrics.jsonl")[0]
    assert skipped["zero_std_groups"] == 0.5 and skipped["update_fraction"] == (1 + 8) / 16 and whole["update_fraction"] == 1
    diff = max((a - b).abs().max().item() for a, b in zip(weights(root / "flat-True", 1), weights(root / "flat-False", 1), strict=True))
    assert diff < 1e-6


def test_a_deepspeed_launch_is_refused_with_one_line_naming_fsdp2(monkeypatch, tmp_path):
    from rlreason.config import ConfigError, load_config
    from rlreason.training.setup import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    config = load_config(None, [f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as refused:
        make_accelerator(config)
    assert len(refused.value.problems) == 1 and "configs/accelerate/fsdp2.yaml" in refused.value.problems[0]
