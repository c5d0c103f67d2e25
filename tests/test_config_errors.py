"""A table of bad configs: each is refused before a model loads, with one line that names the problem."""

import pytest

from rlreason.cli import main

CASES = [
    (["train.lerning_rate=1e-5"], "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?"),
    (["rollout.grup_size=4"], "rollout.grup_size: unknown key; did you mean 'rollout.group_size'?"),
    (["trian.steps=3"], "trian: unknown key; did you mean 'train'?"),
    (["train.steps=ten"], "train.steps: expected int, got str 'ten'"),
    (["rollout.temperature=[1]"], "rollout.temperature: expected float, got list [1]"),
    (["rollout.group_size=1"], "rollout.group_size: must be >= 2"),
    (["rollout.prompts_per_step=3", "rollout.group_size=3", "train.micro_batch_size=2"],
     "train.micro_batch_size: must divide the batch of prompts_per_step x group_size = 9"),
    (["rollout.temperature=0"], "rollout.temperature: must be > 0"),
    (["rollout.top_p=1.5"], "rollout.top_p: must be in (0, 1]"),
    (["train.beta=-0.1"], "train.beta: must be >= 0"),
    (["train.kl_in_reward=true"], "train.kl_in_reward"),
    (["train.epsilon=0"], "train.epsilon: must be > 0"),
    (["train.loss_type=ppo"], "train.loss_type"),
    (["train.max_bad_steps=0"], "train.max_bad_steps: must be >= 1"),
    (["rewards=[{name: math_acuracy}]"], "rewards[0].name: unknown reward 'math_acuracy'; did you mean 'math_accuracy'?"),
    (["rewards=[{name: nosuchpkg.mod:fn}]"], "rewards[0].name: reward 'nosuchpkg.mod:fn': cannot import module 'nosuchpkg.mod'"),
    (["rewards=[]"], "rewards: at least one reward is needed"),
    (["task.name=arithmatic"], "task.name: unknown task 'arithmatic'; did you mean 'arithmetic'?"),
    (["sft.data=/nonexistent/traces.jsonl", "sft.steps=5"], "sft.data: file '/nonexistent/traces.jsonl' does not exist"),
    (["run.output_dir=OUTSIDE/a-file/run"], "cannot be written (OUTSIDE/a-file is not a writable directory)"),
    (["train.cuda_graphs=true"], "train.cuda_graphs: needs train.compile"),
    (["train.cuda_graphs=true", "train.compile=true", "rollout.engine=fast", "train.packing=true"],
     "train.cuda_graphs: padded rows only"),
    (["model.dtype=float8"], "model.dtype: must be 'float32' or 'bfloat16'"),
    (["eval.samples=2", "eval.k=[4]"], "eval.k: every k must be between 1 and eval.samples = 2"),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[c[0][0].split("=")[0] for c in CASES])
def test_bad_config_is_refused_with_a_named_problem(overrides, expected, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    (tmp_path / "a-file").write_text("not a directory")
    overrides = [o.replace("OUTSIDE", str(tmp_path)) for o in overrides]
    expected = expected.replace("OUTSIDE", str(tmp_path))
    assert main(["train", str(config), *overrides]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error: ")]
    assert any(expected in line for line in lines), lines
    assert not (tmp_path / "run").exists()


def test_every_problem_of_a_config_is_reported_at_once(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("rollout: {group_size: 1, temperature: -1}\ntrain: {steps: x, lerning_rate: 1, micro_batch_size: 4}\n")
    assert main(["train", str(config)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("config error: ") for line in lines)


def test_task_rows_missing_a_field_a_reward_needs(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"run: {{output_dir: {tmp_path / 'run'}}}\nmodel: {{name: {tmp_path / 'never-loaded'}}}\n"
        "task: {name: humaneval, train_size: 4, eval_size: 2}\nrewards: [{name: math_accuracy}]\n"
    )
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'math_accuracy' reads the sample field(s) ['answer'], which rows of task 'humaneval' do not have" in err


YAML_CASES = [
    ("train:\n\tsteps: 3\n", "line 2, column 1: found character '\\t' that cannot start any token (YAML indents with spaces"),
    ("train: {steps: 3\nrollout: {group_size: 4}\n", "line 2, column 8: expected ',' or '}', but got ':'"),
    ("train:\n  steps: 3\n  learning_rate: 1e-5\n  steps: 5\n", "line 4, column 3: duplicate key 'steps' (first given on line 2)"),
]


@pytest.mark.parametrize(("text", "expected"), YAML_CASES, ids=["tab", "syntax", "duplicate-key"])
def test_a_broken_yaml_file_is_one_line_naming_file_and_line(text, expected, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["train", str(config), f"run.output_dir={tmp_path / 'run'}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"config error: {config}: {expected}"), line


def test_a_broken_yaml_override_names_the_override(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    assert main(["eval", str(config), "train.adam_betas=[0.9, 0.99", "rollout.group_size={a: 1, a: 2}"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "config error: override 'train.adam_betas=[0.9, 0.99': the value is not valid YAML (line 1, column 11: "
        "expected ',' or ']', but got '<stream end>')",
        "config error: override 'rollout.group_size={a: 1, a: 2}': the value is not valid YAML (line 1, column 8: "
        "duplicate key 'a' (first given on line 1))",
    ]


def test_an_output_dir_that_cannot_be_created_is_refused_before_anything_runs(tmp_path, capsys):
    too_long = tmp_path / ("x" * 300) / "run"
    config = tmp_path.parent / f"{tmp_path.name}.yaml"
    config.write_text("task: {name: arithmetic}\n")
    assert main(["eval", str(config), f"run.output_dir={too_long}"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"config error: run.output_dir: {str(too_long)!r} cannot be created in {tmp_path} (File name too long)"
    assert [p.name for p in tmp_path.iterdir()] == []
