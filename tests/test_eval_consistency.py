"""One evaluation, one number: `rlreason eval` and the trainer's evaluation agree, say their precision, keep every
report, show a failed verifier as missing, and draw their prompts from the eval split with their own seed."""

import json
import re

from conftest import make_tiny_model, write_config

from rlreason.cli import main
from rlreason.config import load_config
from rlreason.observe.evaluate import eval_split
from rlreason.training.trainer import Trainer
from tasks.sources import split_of


def sandbox_down(completions, samples):
    """A verifier whose sandbox cannot start."""
    raise RuntimeError("sandbox could not start: no space left on device")


def _reports(directory):
    return sorted((directory / "eval-reports").glob("eval-*.json"))


def test_eval_command_and_trainer_give_the_same_completions_in_bf16(tmp_path, capsys):
    # this tiny Qwen2 writes 16 characters per prompt, and 2 of these 8 greedy completions change under bf16 autocast
    model = make_tiny_model(tmp_path / "qwen2", "qwen2")
    config = write_config(
        tmp_path / "c.yaml", model, tmp_path / "run", train={"bf16": "true"}, task={"name": "arithmetic", "eval_size": 8},
        rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16},
    )
    trainer_result = Trainer(load_config(config)).evaluate("base")
    assert main(["eval", str(config)]) == 0
    assert "precision bf16" in capsys.readouterr().out
    (report,) = _reports(tmp_path / "run")
    eval_result = json.loads(report.read_text())
    assert eval_result["precision"] == trainer_result["precision"] == "bf16"
    assert [s["completion"] for s in eval_result["samples"]] == [s["completion"] for s in trainer_result["samples"]]
    assert eval_result["accuracy"] == trainer_result["accuracy"]


def test_every_evaluation_keeps_its_own_report(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", task={"name": "arithmetic", "eval_size": 2})
    for _ in range(2):
        assert main(["eval", str(config), "rollout.max_new_tokens=4"]) == 0
    first, second = _reports(tmp_path / "run")
    assert first.name.startswith(f"eval-{tiny_llama.name}-") and first != second
    out = tmp_path / "mine.json"
    assert main(["eval", str(config), "rollout.max_new_tokens=4", f"--out={out}"]) == 0
    assert json.loads(out.read_text())["num_prompts"] == 2
    capsys.readouterr()
    assert main(["eval", str(config), f"--out={out}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(_reports(tmp_path / "run")) == 2


def test_a_failed_verifier_reads_as_missing_not_as_zero(tiny_llama, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run", task={"name": "arithmetic", "eval_size": 2},
        rewards=[{"name": "test_eval_consistency:sandbox_down"}, {"name": "think_format", "weight": 0.2}],
        rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4},
    )
    assert main(["eval", str(config), "eval.samples=2", "eval.k=[1,2]"]) == 0
    out = capsys.readouterr().out
    assert "accuracy (greedy)            n/a" in out and "pass@1                       n/a" in out
    assert "verifier test_eval_consistency:sandbox_down failed: RuntimeError: sandbox could not start" in out
    (report,) = _reports(tmp_path / "run")
    result = json.loads(report.read_text())
    assert result["accuracy"] is None and result["pass@2"] is None and result["maj@1"] is None
    assert "sandbox could not start" in result["verifier_errors"]["test_eval_consistency:sandbox_down"]


def test_a_sampled_evaluation_shows_progress(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run", task={"name": "arithmetic", "eval_size": 2})
    overrides = ["eval.samples=2", "rollout.max_new_tokens=4"]
    assert main(["eval", str(config), *overrides, "run.progress=true"]) == 0
    assert "eval 2 samples" in capsys.readouterr().err
    assert main(["eval", str(config), *overrides]) == 0  # write_config turns the bar off
    assert "eval" not in capsys.readouterr().err


def test_eval_seed_draws_other_held_out_problems_never_train_ones(tmp_path):
    base = ["task.eval_size=30", f"run.output_dir={tmp_path}"]
    default, same, other = (eval_split(load_config(None, base + extra)) for extra in ([], ["eval.seed=0"], ["eval.seed=7"]))
    assert default["prompt"] == same["prompt"]  # eval.seed defaults to train.seed (0)
    assert set(map(str, other["prompt"])) != set(map(str, default["prompt"]))
    assert len(other) == 30
    problems = [re.search(r"What is (\d+) ([-+*]) (\d+)\?", row["prompt"][-1]["content"]).groups() for row in other]
    assert all(split_of("".join(problem)) == "eval" for problem in problems)
