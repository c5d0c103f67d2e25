"""The loop learns: a tiny model goes from chance to >= 0.8 mean reward on a trivially verifiable reward."""

import time

from conftest import make_tiny_model, write_config

from rewards.registry import reward
from rlreason.config import load_config
from rlreason.training.trainer import Trainer
from tasks.prompts import chat
from tasks.registry import task


@task("say_seven")
def say_seven(split: str, size: int, seed: int = 0):
    from datasets import Dataset

    words = ["cat", "dog", "sun", "sky", "tree", "moon", "car", "fish"]
    chosen = words[:4] if split == "train" else words[4:]
    return Dataset.from_list(
        [{"prompt": chat(f"Say seven: {chosen[i % 4]}", system=""), "task": "say_seven"} for i in range(size)]
    )


@reward("starts_with_seven")
def starts_with_seven(completions, samples):
    return [1.0 if c.startswith("7") else 0.0 for c in completions]


def test_tiny_model_learns_to_answer_seven(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model", seed=3)
    config = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tmp_path / "run",
        task={"name": "say_seven", "train_size": 16, "eval_size": 8},
        rewards=[{"name": "starts_with_seven"}],
        rollout={"prompts_per_step": 8, "group_size": 8, "max_new_tokens": 2},
        train={"steps": 60, "learning_rate": 3e-3, "micro_batch_size": 64, "seed": 0},
        run={"eval_before": False},
    )
    trainer = Trainer(load_config(config))
    start = time.perf_counter()
    rewards: list[float] = []
    while len(rewards) < 60 and not (len(rewards) >= 5 and sum(rewards[-5:]) / 5 >= 0.8):
        rewards.append(trainer.train_step()["reward"])
    elapsed = time.perf_counter() - start
    assert sum(rewards[:3]) / 3 < 0.1, f"should start near chance (~1/105), got {rewards[:3]}"
    assert sum(rewards[-5:]) / 5 >= 0.8, f"did not learn: last rewards {rewards[-5:]}"
    assert elapsed < 120
