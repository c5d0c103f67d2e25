"""Config loading: YAML + overrides into dataclasses, every problem named, before any model loads."""

import pytest
from conftest import problems_of

from rlreason.config import SampleConfig, TrainConfig, choices, load_config


def test_overrides_are_typed_and_dotted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-5\n  steps: 3\nrollout:\n  group_size: 4\n")
    config = load_config(path, ["train.steps=7", "rollout.temperature=0.7", "task.options={digits: 3}"])
    assert config.train.learning_rate == 1e-5 and isinstance(config.train.learning_rate, float)
    assert config.train.steps == 7 and config.rollout.group_size == 4
    assert config.rollout.temperature == 0.7 and config.task.options == {"digits": 3}


def test_reward_list_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  - {name: think_format, weight: 0.5}\n")
    config = load_config(path)
    assert [(r.name, r.weight) for r in config.rewards] == [("think_format", 0.5)]


def test_unknown_key_suggests_the_closest():
    assert problems_of(["train.lerning_rate=1"]) == [
        "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?"
    ]


def test_all_problems_reported_at_once():
    problems = problems_of(
        [
            "rollout.group_size=1",
            "rollout.temperature=hot",
            "train.steps=1.5",
            "tsk.name=x",
            "train.micro_batch_size=2",
        ]
    )
    assert len(problems) == 4
    assert any(p.startswith("rollout.group_size: must be >= 2") for p in problems)
    assert any(p.startswith("rollout.temperature: expected float") for p in problems)
    assert any(p.startswith("train.steps: expected int") for p in problems)
    assert any(p.startswith("tsk: unknown key; did you mean 'task'") for p in problems)


def test_batch_must_split_into_micro_batches():
    (problem,) = problems_of(
        ["rollout.prompts_per_step=3", "rollout.group_size=4", "train.micro_batch_size=5"]
    )
    assert problem.startswith(
        "train.micro_batch_size: must divide the batch of prompts_per_step x group_size = 12"
    )


def test_unknown_reward_and_task_names():
    problems = problems_of(["rewards=[{name: math_acuracy}]", "task.name=arithmetc"])
    assert "did you mean 'math_accuracy'" in problems[0]
    assert "did you mean 'arithmetic'" in problems[1]


def test_missing_config_file_and_missing_sft_data(tmp_path):
    assert "does not exist" in problems_of([], tmp_path / "nope.yaml")[0]
    assert problems_of([f"sft.data={tmp_path / 'x.jsonl'}", "sft.steps=3"])[0].startswith("sft.data: file")


def test_malformed_override():
    assert problems_of(["train.steps"])[0].startswith("override 'train.steps': expected key=value")


CHOICE_CASES = [
    ("train.loss_type=ppo", "train.loss_type: must be one of 'grpo', 'bnpo', 'dapo', 'dr_grpo', got 'ppo'"),
    ("train.advantage=mean", "train.advantage: must be one of 'group', 'rloo', got 'mean'"),
    ("train.scale_rewards=std", "train.scale_rewards: must be one of 'group', 'batch', 'none', got 'std'"),
    ("train.importance_sampling=seq", "train.importance_sampling: must be one of 'token', 'sequence', got 'seq'"),
    ("train.kl_estimator=k4", "train.kl_estimator: must be one of 'k1', 'k2', 'k3', got 'k4'"),
    ("train.overlong=cut", "train.overlong: must be one of 'none', 'mask', 'soft', got 'cut'"),
    ("train.bf16=maybe", "train.bf16: must be 'auto', 'true' or 'false', got 'maybe'"),
    ("model.dtype=float16", "model.dtype: must be 'float32' or 'bfloat16', got 'float16'"),
    ("rollout.engine=vllm", "rollout.engine: unknown engine 'vllm'; available: 'hf', 'fast'"),
    ("sample.keep=first", "sample.keep: must be one of 'all', 'best', 'shortest', got 'first'"),
    ("train.loss_type=3", "train.loss_type: expected str, got int 3"),
    ("train.scale_rewards=3", "train.scale_rewards: expected str or bool, got 3"),
]


@pytest.mark.parametrize(("override", "expected"), CHOICE_CASES, ids=[c[0] for c in CHOICE_CASES])
def test_a_closed_choice_names_its_values(override, expected):
    assert problems_of([override]) == [expected]


@pytest.mark.parametrize(("spelling", "read_as"), [("true", "group"), ("false", "none"), ("batch", "batch")])
def test_scale_rewards_reads_the_boolean_spelling(spelling, read_as):
    assert load_config(None, [f"train.scale_rewards={spelling}"]).train.scale_rewards == read_as


def test_choices_come_from_the_annotation():
    assert choices(TrainConfig, "scale_rewards") == ("group", "batch", "none")
    assert choices(SampleConfig, "keep") == ("all", "best", "shortest")
    with pytest.raises(TypeError, match="TrainConfig.steps is not annotated with a Literal"):
        choices(TrainConfig, "steps")


@pytest.mark.parametrize(("spelling", "read_as"), [("true", "true"), ("false", "false"), ("'true'", "true"), ("auto", "auto")])
def test_bf16_reads_an_unquoted_boolean_override(spelling, read_as):
    assert load_config(None, [f"train.bf16={spelling}"]).train.bf16 == read_as
