"""Training on a mixture of tasks from the config: rows keep their task and each reward scores only its own."""

from conftest import write_config

from rlreason.cli import main
from rlreason.observe.runlog import read_jsonl


def test_mixed_math_and_logic_run(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, run_dir,
        task={"train_size": 8, "eval_size": 4, "mix": [
            {"name": "arithmetic", "weight": 1.0, "options": {"digits": 1}},
            {"name": "countdown", "weight": 1.0},
        ]},
        rewards=[{"name": "math_accuracy"}, {"name": "logic_accuracy"}],
        rollout={"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4},
        train={"steps": 1, "micro_batch_size": 8}, run={"eval_before": False},
    )
    assert main(["train", str(config)]) == 0
    completions = read_jsonl(run_dir / "completions.jsonl")
    by_task = {c["task"]: c["rewards"] for c in completions}
    assert set(by_task) == {"arithmetic", "countdown"}
    assert by_task["arithmetic"]["logic_accuracy"] is None and by_task["arithmetic"]["math_accuracy"] is not None
    assert by_task["countdown"]["math_accuracy"] is None and by_task["countdown"]["logic_accuracy"] is not None
    metrics = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert "accuracy/arithmetic" in metrics and "accuracy/countdown" in metrics


def test_mixture_entries_are_validated(tiny_llama, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
                          task={"mix": [{"name": "arithmetc"}, {"name": "countdown", "weight": 0}]})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "task.mix[0].name: unknown task 'arithmetc'" in err and "task.mix[1].weight: must be a number > 0" in err
